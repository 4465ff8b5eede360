//! Changelog and restore without Kafka: the processor's commit-interval records, written and
//! cut short the way a crash cuts them, must rebuild state so that a replay from the restored
//! position re-emits only changes already emitted (same customer, seq and payload) and loses
//! none. The Kafka plumbing around the same calls is tested in `tests/durability.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use microseg::config::TimeConfig;
use microseg::engine::{Customer, CustomerView, Engine};
use microseg::event::decode;
use microseg::generate::{Generated, Generator};
use microseg::output::{change_json, Cause};
use microseg::processor::{Fired, Processor, Source};
use microseg::restore::restore;
use microseg::rules::RuleSet;
use microseg::state::AttrVal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PARTITIONS: i32 = 2;

fn time() -> TimeConfig {
    TimeConfig {
        allowed_lateness_ms: 60 * 60_000,
        // Time advances with the input only, as in a replay.
        idle_timeout_ms: i64::MAX / 4,
        ..TimeConfig::default()
    }
}

/// Every customer a processor holds, by id.
/// Copies of the customers held, by id.
fn held(p: &Processor) -> BTreeMap<String, Customer> {
    let mut m = BTreeMap::new();
    p.for_each_customer(|id, c| {
        m.insert(id.to_string(), c.clone());
    });
    m
}

/// What of the customers held compares, by id.
fn customers(p: &Processor) -> BTreeMap<String, CustomerView> {
    let mut m = BTreeMap::new();
    p.for_each_customer(|id, c| {
        m.insert(id.to_string(), p.engine().view(c));
    });
    m
}

/// Duplicate detection by event id is off: a replay must be exact without its help.
fn processor(rules: &Arc<RuleSet>) -> Processor {
    Processor::new(Engine::new(rules.clone()).with_dedup(0), &time(), 1)
}

/// Generated input, each event with its partition and offset there.
fn input(seed: u64, n: usize) -> Vec<(Generated, i32, i64)> {
    let mut g = Generator::new(seed, 60, 1_767_225_600_000, 6 * 3_600_000);
    let mut next = [0i64; PARTITIONS as usize];
    (0..n)
        .map(|_| {
            let ev = g.next_event();
            let p = ev.customer_id.bytes().map(i32::from).sum::<i32>() % PARTITIONS;
            let o = next[p as usize];
            next[p as usize] += 1;
            (ev, p, o)
        })
        .collect()
}

/// Processes one input message; returns its changes as published.
fn process(p: &Processor, rules: &RuleSet, (g, part, off): &(Generated, i32, i64)) -> Vec<Vec<u8>> {
    let Ok(ev) = decode(g.json.as_bytes()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let src = Source {
        topic: 0,
        partition: *part,
        offset: *off,
    };
    let _ = p.event(src, &ev, 0, &mut out, &mut Fired::default());
    out.iter()
        .map(|e| {
            let cause = Cause::of(
                &e.change,
                Cause::Event {
                    event_id: ev.event_id.as_deref(),
                    topic: "events",
                    partition: *part,
                    offset: *off,
                },
            );
            change_json(rules, &e.customer_id, cause, &e.change)
        })
        .collect()
}

/// The change stream keyed by (customer, seq), checking every duplicate is identical.
fn dedup(stream: &[Vec<u8>]) -> BTreeMap<(String, u64), Vec<u8>> {
    let mut out: BTreeMap<(String, u64), Vec<u8>> = BTreeMap::new();
    for bytes in stream {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        let key = (
            v["customer_id"].as_str().unwrap().to_owned(),
            v["seq"].as_u64().unwrap(),
        );
        if let Some(prev) = out.insert(key.clone(), bytes.clone()) {
            assert_eq!(
                prev,
                *bytes,
                "{key:?} re-emitted with another payload:\n{}\n{}",
                String::from_utf8_lossy(&prev),
                String::from_utf8_lossy(bytes)
            );
        }
    }
    out
}

/// A changelog record: key, value.
type Record = (Vec<u8>, Vec<u8>);

/// Runs the input with crashes at random moments and returns (delivered change stream,
/// restores done, crashes in the middle of a changelog write, the last processor).
fn run_with_crashes(
    rules: &Arc<RuleSet>,
    events: &[(Generated, i32, i64)],
    rng: &mut StdRng,
) -> (Vec<Vec<u8>>, usize, usize, Processor) {
    // What outlives a crash: the output topic, the changelog (per partition, in log order)
    // and the committed offsets.
    let mut delivered: Vec<Vec<u8>> = Vec::new();
    let mut changelog: HashMap<i32, Vec<Record>> = HashMap::new();
    let mut committed = [0i64; PARTITIONS as usize];
    let mut mid_write = 0;
    let mut restores = 0;

    let mut p = processor(rules);
    let mut next = [0i64; PARTITIONS as usize];
    let mut pending: Vec<Vec<u8>> = Vec::new(); // produced, not yet known delivered
    let mut i = 0;
    while i < events.len() {
        let (_, part, off) = &events[i];
        i += 1;
        if *off < next[*part as usize] {
            continue; // before the restored position: the consumer seeks past it
        }
        pending.extend(process(&p, rules, &events[i - 1]));
        next[*part as usize] = off + 1;

        let roll = rng.gen_range(0..100);
        if roll < 8 {
            // A commit interval: output delivered → changelog written → offsets committed.
            delivered.append(&mut pending);
            let mut cut = None;
            if roll == 0 {
                // Crash while writing the changelog: only a prefix of the records lands.
                cut = Some(rng.gen_range(0..20));
            }
            let mut n = 0;
            'write: for part in 0..PARTITIONS {
                for (k, v) in &p.changelog(part, &[next[part as usize]]) {
                    if cut.is_some_and(|c| n >= c) {
                        break 'write;
                    }
                    changelog
                        .entry(part)
                        .or_default()
                        .push((k.to_vec(), v.to_vec()));
                    n += 1;
                }
            }
            if cut.is_none() {
                committed = next;
                continue;
            }
            mid_write += 1;
        } else if roll < 97 {
            continue;
        } else {
            // Crash between intervals: some of the output produced since the last one was
            // delivered, the rest is lost with the process.
            let keep = rng.gen_range(0..=pending.len());
            delivered.extend(pending.drain(..keep));
        }
        // Restart: a new process restores every partition, then consumes from the
        // checkpoint (or the committed offset when there is none).
        pending.clear();
        restores += 1;
        // As the pipeline does: the partitions on worker threads, fed in log order.
        p = processor(rules);
        let parts: Vec<i32> = (0..PARTITIONS).collect();
        let restorers = restore(&p, &parts, 2, |feed| {
            for part in 0..PARTITIONS {
                for (o, (k, v)) in changelog.get(&part).into_iter().flatten().enumerate() {
                    feed.record(part, o as i64, k, Some(v))?;
                }
            }
            Ok(())
        })
        .unwrap();
        for (part, r) in restorers {
            let restored = r.finish();
            next[part as usize] = match restored.offsets {
                Some(o) => o[0].max(0),
                None => committed[part as usize],
            };
        }
        i = 0;
    }
    delivered.append(&mut pending);
    (delivered, restores, mid_write, p)
}

#[test]
fn crashes_at_any_moment_re_emit_only_identical_changes_and_lose_none() {
    let rules = Arc::new(RuleSet::embedded_default());
    let mut mid_writes = 0;
    for seed in 0..12u64 {
        let events = input(seed, 1500);
        let reference = processor(&rules);
        let expected: Vec<Vec<u8>> = events
            .iter()
            .flat_map(|e| process(&reference, &rules, e))
            .collect();
        assert!(expected.len() > 200, "the input moves customers");
        let expected = dedup(&expected);

        let mut rng = StdRng::seed_from_u64(seed);
        let (stream, restores, mid_write, last) = run_with_crashes(&rules, &events, &mut rng);
        assert!(restores >= 3, "seed {seed}: only {restores} restores");
        mid_writes += mid_write;
        let got = dedup(&stream);
        let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
        assert!(missing.is_empty(), "seed {seed}: changes lost: {missing:?}");
        for (k, v) in &got {
            let want = expected
                .get(k)
                .map(|w| String::from_utf8_lossy(w).into_owned());
            assert_eq!(
                Some(String::from_utf8_lossy(v).into_owned()),
                want,
                "seed {seed}: change {k:?} is not the uninterrupted run's"
            );
        }
        // Final state equals the uninterrupted run's, customer by customer.
        let (last, reference) = (customers(&last), customers(&reference));
        assert_eq!(last.len(), reference.len());
        for (id, r) in &reference {
            let c = &last[id];
            assert_eq!(c.state, r.state, "seed {seed}: state of {id}");
            assert_eq!(
                (&c.segments, &c.members, c.seq, c.timer),
                (&r.segments, &r.members, r.seq, r.timer)
            );
        }
    }
    assert!(mid_writes > 0, "some crashes cut a changelog write short");
}

#[test]
fn a_restore_rebuilds_customers_timers_and_the_watermark() {
    let rules = Arc::new(RuleSet::embedded_default());
    let events = input(7, 800);
    let a = processor(&rules);
    let mut next = [0i64; PARTITIONS as usize];
    for e in &events {
        process(&a, &rules, e);
        next[e.1 as usize] = e.2 + 1;
    }
    let b = processor(&rules);
    let mut all: Vec<Vec<(Vec<u8>, Vec<u8>)>> = Vec::new();
    for part in 0..PARTITIONS {
        let records = a.changelog(part, &[next[part as usize]]);
        all.push(
            records
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
        );
        let customers = records.len() - 1;
        assert!(
            a.changelog(part, &[next[part as usize]]).is_empty(),
            "nothing new to write"
        );
        let mut r = b.restorer(part);
        for (k, v) in &records {
            r.record(k, Some(v)).unwrap();
        }
        let restored = r.finish();
        assert_eq!(restored.customers as usize, customers);
        assert_eq!(restored.offsets, Some(vec![next[part as usize]]));
        assert_eq!(b.watermark(part), a.watermark(part));
    }
    assert_eq!(b.timers_pending(), a.timers_pending());
    assert!(a.timers_pending() > 0);
    assert!(a.customer_count() > 0);
    assert_eq!(customers(&b), customers(&a));
    // The same records on worker threads, as the pipeline restores, rebuild the same.
    for threads in [1, 2, 4] {
        let c = processor(&rules);
        let parts: Vec<i32> = (0..PARTITIONS).collect();
        let restorers = restore(&c, &parts, threads, |feed| {
            // Interleaved across partitions, as a reader of several receives them; a record
            // of a partition not being restored is ignored.
            let longest = all.iter().map(Vec::len).max().unwrap_or(0);
            for i in 0..longest {
                for (part, records) in all.iter().enumerate() {
                    if let Some((k, v)) = records.get(i) {
                        feed.record(part as i32, i as i64, k, Some(v))?;
                    }
                }
                feed.record(PARTITIONS, i as i64, b"c-x", Some(b"not restored"))?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(
            restorers.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            parts,
            "in the order asked"
        );
        for (part, r) in restorers {
            let restored = r.finish();
            assert_eq!(restored.offsets, Some(vec![next[part as usize]]));
            assert_eq!(c.watermark(part), a.watermark(part));
        }
        assert_eq!(c.timers_pending(), a.timers_pending(), "{threads} threads");
        assert_eq!(customers(&c), customers(&a), "{threads} threads");
        // A corrupt record fails the restore with its partition and offset, however much
        // is fed after it (the worker stops taking batches).
        let failed = restore(&c, &parts, threads, |feed| {
            feed.record(1, 0, &all[1][0].0, Some(&all[1][0].1))?;
            feed.record(1, 1, b"c-1", Some(b"Mxyz"))?;
            for i in 0..20_000 {
                feed.record(1, 2 + i, &all[1][0].0, Some(&all[1][0].1))?;
            }
            Ok(())
        });
        let e = failed.err().expect("a corrupt record fails the restore");
        assert!(e.contains("partition 1 offset 1"), "{e}");
    }

    // A corrupt record is an error, not a silently missing customer.
    let mut r = b.restorer(0);
    assert!(r.record(b"c-1", Some(b"Mxyz")).is_err());
    assert!(r
        .record(microseg::changelog::CHECKPOINT_KEY, Some(b"garbage"))
        .is_err());
}

/// An attribute's value, its string by name.
#[derive(Debug, PartialEq)]
enum Shown {
    Str(String),
    Num(f64),
    Bool(bool),
    Unset,
}

/// A changelog written under other rules keeps state and seq; memberships and timers are
/// recomputed from the state under the new rules, without emitting or counting a change.
#[test]
fn records_written_under_other_rules_are_re_evaluated_silently() {
    let old_rules = Arc::new(RuleSet::embedded_default());
    let text = microseg::rules::DEFAULT_RULES.replace(
        "days_since(purchases.last) > 60",
        "days_since(purchases.last) > 20",
    );
    let new_rules = Arc::new(RuleSet::from_toml("new.toml", &text).unwrap());
    assert_ne!(old_rules.version, new_rules.version);
    let a = processor(&old_rules);
    let mut next = [0i64; PARTITIONS as usize];
    for e in &input(9, 900) {
        process(&a, &old_rules, e);
        next[e.1 as usize] = e.2 + 1;
    }
    let b = processor(&new_rules);
    for part in 0..PARTITIONS {
        let mut r = b.restorer(part);
        for (k, v) in &a.changelog(part, &[next[part as usize]]) {
            r.record(k, Some(v)).unwrap();
        }
        r.finish();
    }
    let engine = b.engine();
    let mut differ = 0;
    let restored = held(&b);
    for (id, old) in &held(&a) {
        let c = &restored[id];
        // Symbol ids belong to each rule set's table: compare what does not use them.
        let (x, y) = (&c.state, &old.state);
        assert_eq!(
            (
                c.seq,
                x.last_seen,
                x.purchase_count,
                x.engagement_count,
                x.spend
            ),
            (
                old.seq,
                y.last_seen,
                y.purchase_count,
                y.engagement_count,
                y.spend
            ),
            "state and seq kept"
        );
        let windows = |s: &microseg::state::CustomerState| {
            let a = &s.activity;
            (
                a.purchases().iter().collect::<Vec<_>>(),
                a.engagements().len(),
            )
        };
        // Attribute strings are symbols too: compare them by name.
        let attrs = |s: &microseg::state::CustomerState, rules: &RuleSet| {
            let declared = rules.state.attributes.len();
            s.attrs()
                .values(declared)
                .into_iter()
                .map(|v| match v {
                    Some(AttrVal::Str(s)) => Shown::Str(rules.symbols.name(s).to_string()),
                    Some(AttrVal::Num(n)) => Shown::Num(n),
                    Some(AttrVal::Bool(b)) => Shown::Bool(b),
                    None => Shown::Unset,
                })
                .collect::<Vec<_>>()
        };
        let held = attrs(x, &new_rules);
        assert!(held.iter().any(|v| matches!(v, Shown::Str(_))), "{held:?}");
        assert_eq!((windows(x), held), (windows(y), attrs(y, &old_rules)));
        let at = c.state.last_seen;
        assert_eq!(
            engine.memberships(c),
            engine.evaluate_all(&c.state, at),
            "{id}: memberships from the new rules"
        );
        assert!(c.timer == microseg::state::NEVER || c.timer > at);
        differ += (engine.memberships(c) != a.engine().memberships(old)) as usize;
    }
    assert!(differ > 0, "the rules change moved someone");
    assert!(
        b.timers_pending() > 0,
        "timers scheduled under the new rules"
    );
}

/// Processes `evs`; per partition, the customers they changed: those with an event, and
/// those with a change (a timer's among them).
fn changed_by(
    p: &Processor,
    rules: &RuleSet,
    evs: &[(Generated, i32, i64)],
    next: &mut [i64],
) -> Vec<Vec<String>> {
    let mut changed = vec![std::collections::BTreeSet::new(); next.len()];
    for e in evs {
        if decode(e.0.json.as_bytes()).is_ok() {
            changed[e.1 as usize].insert(e.0.customer_id.clone());
        }
        for json in process(p, rules, e) {
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            changed[e.1 as usize].insert(v["customer_id"].as_str().unwrap().to_owned());
        }
        next[e.1 as usize] = e.2 + 1;
    }
    changed
        .into_iter()
        .map(|c| c.into_iter().collect())
        .collect()
}

/// The customer ids of one partition's changelog records, sorted.
fn written(p: &Processor, part: i32, next: i64) -> Vec<String> {
    let mut keys: Vec<String> = p
        .changelog(part, &[next])
        .iter()
        .filter(|(k, _)| *k != microseg::changelog::CHECKPOINT_KEY)
        .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap())
        .collect();
    keys.sort_unstable();
    keys
}

/// Each customer changed in an interval is written once, however many events or timers
/// changed it; the next interval writes only the customers changed since; `dirty()` counts
/// what is due.
#[test]
fn each_changed_customer_is_written_once_per_interval() {
    let rules = Arc::new(RuleSet::embedded_default());
    let events = input(11, 600);
    let a = processor(&rules);
    let mut next = [0i64; PARTITIONS as usize];
    let (first, second) = events.split_at(400);
    let changed = changed_by(&a, &rules, first, &mut next);
    assert_eq!(a.dirty(), changed.iter().map(Vec::len).sum::<usize>());
    for part in 0..PARTITIONS {
        assert_eq!(
            written(&a, part, next[part as usize]),
            changed[part as usize]
        );
    }
    assert_eq!(a.dirty(), 0);
    let changed = changed_by(&a, &rules, second, &mut next);
    for part in 0..PARTITIONS {
        let ids = &changed[part as usize];
        assert!(!ids.is_empty() && ids.len() < 60);
        assert_eq!(&written(&a, part, next[part as usize]), ids);
        assert!(
            written(&a, part, next[part as usize]).is_empty(),
            "nothing new"
        );
    }
}

/// Every record holds the customer's state at the take, byte for byte: whether its body was
/// encoded at the customer's first change in the interval (and nothing changed it since) or
/// again at the take (changed more than once). Takes every few events, so both happen often.
#[test]
fn records_hold_the_state_at_the_take_however_often_the_customer_changed_and_in_reused_buffers() {
    use microseg::changelog::{encode, CHECKPOINT_KEY};
    let rules = Arc::new(RuleSet::embedded_default());
    let a = processor(&rules);
    let mut next = [0i64; PARTITIONS as usize];
    let (mut once, mut more) = (0, 0);
    for chunk in input(13, 1_500).chunks(9) {
        let mut events: HashMap<&str, usize> = HashMap::new();
        for e in chunk {
            process(&a, &rules, e);
            next[e.1 as usize] = e.2 + 1;
            *events.entry(e.0.customer_id.as_str()).or_default() += 1;
        }
        for part in 0..PARTITIONS {
            let offsets = [next[part as usize]];
            let records = a.changelog(part, &offsets);
            let mut keys: Vec<&[u8]> = records.iter().map(|(k, _)| k).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), records.len(), "one record per customer");
            for (k, v) in &records {
                if k == CHECKPOINT_KEY {
                    continue;
                }
                let id = std::str::from_utf8(k).unwrap();
                match events.get(id) {
                    Some(1) => once += 1,
                    Some(_) => more += 1,
                    None => {} // changed by a timer only
                }
                let (partition, c) = a.find_customer(id).unwrap();
                let mut expected = Vec::new();
                encode(a.engine(), &c, partition, &offsets, &mut expected);
                assert!(v == expected, "{id}'s record is not its state at the take");
            }
            // As the pipeline does once they are sent: the next take writes into these
            // buffers (every other chunk, so fresh buffers are covered as well).
            if next[0] % 2 == 0 {
                a.recycle(part, records);
            }
        }
    }
    assert!(
        once > 100 && more > 100,
        "both cases covered: {once} / {more}"
    );
}

/// A customer's mark in the dirty list carries the take it was made in, which wraps around
/// every 256 takes: a mark from 256 takes ago that points at another customer's entry must
/// not pass for this customer's, or its change would be missing from the changelog.
#[test]
fn a_mark_from_256_takes_ago_does_not_hide_a_change() {
    let rules = Arc::new(RuleSet::embedded_default());
    let a = processor(&rules);
    // A purchase by `id` on `day`, read at `offset` of partition 0.
    let purchase = |id: &str, day: i64, offset: i64| {
        let json = format!(
            r#"{{"event_id":"{id}-{day}","customer_id":"{id}","type":"purchase","timestamp":{},"amount":10}}"#,
            1_767_225_600_000 + day * 86_400_000
        );
        let g = Generated {
            customer_id: id.to_string(),
            kind: microseg::generate::Kind::Purchase,
            json,
        };
        process(&a, &rules, &(g, 0, offset));
    };
    // "a" gets the first entry of take 0's list.
    purchase("a", 0, 0);
    assert_eq!(written(&a, 0, 1), ["a"]);
    // 255 more takes: the count is back where "a"'s mark was made.
    for _ in 0..255 {
        assert!(written(&a, 0, 1).is_empty());
    }
    // "b" gets the first entry now; then "a" changes, its mark pointing at "b"'s entry.
    purchase("b", 1, 1);
    purchase("a", 2, 2);
    assert_eq!(written(&a, 0, 3), ["a", "b"]);
}

/// A tombstone empties a customer's slot during a restore. If the next customer restored took
/// that slot, a record of the removed customer still ahead of the final checkpoint (after a
/// crash, records are not in offset order) would lend its offsets to the newcomer, whose
/// replayed input would then be skipped as already reflected: lost.
#[test]
fn a_removed_customers_offsets_never_pass_to_the_customer_restored_after_it() {
    use microseg::changelog::{encode, Checkpoint, CHECKPOINT_KEY};
    use microseg::engine::Applied;
    let rules = Arc::new(RuleSet::embedded_default());
    let a = processor(&rules);
    let json = |id: &str, ts: i64| {
        format!(r#"{{"customer_id":"{id}","type":"purchase","timestamp":{ts},"amount":5}}"#)
    };
    let engine = a.engine();
    let customer = |id: &str| {
        let mut c = engine.new_customer();
        let text = json(id, 1_767_225_600_000);
        let ev = decode(text.as_bytes()).unwrap();
        engine.apply(&mut c, &ev, &mut Vec::new()).unwrap();
        c
    };
    let record = |c: &Customer, offset: i64| {
        let mut v = Vec::new();
        encode(engine, c, 0, &[offset], &mut v);
        v
    };
    let (gone, kept) = (customer("gone"), customer("kept"));
    let mut checkpoint = Vec::new();
    Checkpoint {
        offsets: vec![5],
        watermark: 1_767_225_600_000,
        topics: vec![(1_767_225_600_000, 0)],
    }
    .encode(&mut checkpoint);
    let b = processor(&rules);
    let mut r = b.restorer(0);
    // "gone" was written ahead of the checkpoint (offset 10), then removed; "kept" is
    // covered by it (offset 4).
    r.record(b"gone", Some(&record(&gone, 10))).unwrap();
    r.record(b"gone", None).unwrap();
    r.record(b"kept", Some(&record(&kept, 4))).unwrap();
    r.record(CHECKPOINT_KEY, Some(&checkpoint)).unwrap();
    let restored = r.finish();
    assert_eq!((restored.customers, restored.offsets), (1, Some(vec![5])));
    assert!(b.customer("gone").is_none());
    // Input from the checkpoint on is new to "kept": applied, not skipped.
    let text = json("kept", 1_767_225_700_000);
    let ev = decode(text.as_bytes()).unwrap();
    let src = Source {
        topic: 0,
        partition: 0,
        offset: 6,
    };
    let applied = b.event(src, &ev, 0, &mut Vec::new(), &mut Fired::default());
    assert_eq!(applied, Ok(Applied::Applied));
    // New customers come after it as usual.
    let text = json("new", 1_767_225_700_000);
    let ev = decode(text.as_bytes()).unwrap();
    b.event(src, &ev, 0, &mut Vec::new(), &mut Fired::default())
        .unwrap();
    assert_eq!(b.customer_count(), 2);
}
