//! Criterion micro-benchmarks of the hot path's parts: decode, state update, rule evaluation,
//! the whole engine step, the changelog codec, and what the pipeline does per change (its
//! JSON, its metrics). `cargo bench --bench engine`; the
//! end-to-end figures are `microseg bench` (BENCHMARKS.md).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use microseg::changelog;
use microseg::engine::{Change, Customer, Engine};
use microseg::event::decode;
use microseg::generate::Generator;
use microseg::metrics::Metrics;
use microseg::output::{change_json, Cause};
use microseg::rules::compile::Ctx;
use microseg::rules::RuleSet;
use microseg::state::CustomerState;

const EVENTS: usize = 20_000;

fn input() -> Vec<Vec<u8>> {
    let mut g = Generator::new(1, 2_000, 1_767_225_600_000, 10 * 60_000);
    (0..EVENTS)
        .map(|_| g.next_event().json.into_bytes())
        .collect()
}

fn decode_events(c: &mut Criterion) {
    let bytes = input();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("json_to_event", |b| {
        b.iter(|| {
            for e in &bytes {
                let _ = black_box(decode(black_box(e)));
            }
        })
    });
    g.finish();
}

fn state_update(c: &mut Criterion) {
    let rules = RuleSet::embedded_default();
    let bytes = input();
    let events: Vec<_> = bytes.iter().filter_map(|b| decode(b).ok()).collect();
    let mut g = c.benchmark_group("state");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("apply", |b| {
        b.iter(|| {
            let mut states: HashMap<&str, CustomerState> = HashMap::new();
            for ev in &events {
                states.entry(ev.customer_id.as_ref()).or_default().apply(
                    &rules.state,
                    &rules.symbols,
                    ev,
                );
            }
            black_box(states.len())
        })
    });
    g.finish();
}

fn rule_evaluation(c: &mut Criterion) {
    let bytes = input();
    let mut g = c.benchmark_group("rules");
    for (name, rules) in [
        ("default", RuleSet::embedded_default()),
        (
            "heavy",
            RuleSet::from_toml("bench-heavy.toml", microseg::bench::HEAVY_RULES).unwrap(),
        ),
    ] {
        let engine = Engine::new(Arc::new(rules));
        let mut customers = HashMap::new();
        for b in &bytes {
            if let Ok(ev) = decode(b) {
                let c = customers
                    .entry(ev.customer_id.to_string())
                    .or_insert_with(|| engine.new_customer());
                let _ = engine.apply(c, &ev, &mut Vec::new());
            }
        }
        let now = 1_767_225_600_000 + 40 * 86_400_000;
        g.throughput(Throughput::Elements(customers.len() as u64));
        g.bench_function(format!("evaluate_all_{name}"), |b| {
            b.iter(|| {
                for c in customers.values() {
                    black_box(engine.evaluate_all(&c.state, now));
                }
            })
        });
        // Every rule, as the engine evaluates it (`rules::program`) and by the reference tree
        // walk: the same loop, no result allocated.
        let rules = engine.rules.clone();
        type Holds = fn(&microseg::rules::Rule, &Ctx<'_>) -> bool;
        let evaluators: [(&str, Holds); 2] = [
            ("programs", |r, cx| r.program.holds(cx)),
            ("tree", |r, cx| r.expr.eval_bool(cx)),
        ];
        for (how, holds) in evaluators {
            g.bench_function(format!("{how}_{name}"), |b| {
                b.iter(|| {
                    for c in customers.values() {
                        let cx = Ctx::new(&c.state, &rules.state, &rules.symbols, now);
                        for s in &rules.segmentations {
                            black_box(s.segments.iter().position(|r| holds(r, &cx)));
                        }
                        for r in &rules.segments {
                            black_box(holds(r, &cx));
                        }
                    }
                })
            });
        }
        // Every time-dependent rule's timer analysis, as the engine runs it (`rules::timing`,
        // compiled) and by the reference tree walk, each told the rule's value (read by its
        // program in both loops): the same loop, no cache.
        type Next = fn(&microseg::rules::Rule, &Ctx<'_>, Option<bool>) -> i64;
        let analyses: [(&str, Next); 2] = [
            ("timing_compiled", |r, cx, v| {
                r.timing.next_change_given(cx, v)
            }),
            ("timing_tree", |r, cx, v| r.expr.next_change_given(cx, v)),
        ];
        let timed: Vec<_> = rules
            .segmentations
            .iter()
            .flat_map(|s| &s.segments)
            .chain(&rules.segments)
            .filter(|r| r.timer_slot.is_some())
            .collect();
        for (how, next) in analyses {
            g.bench_function(format!("{how}_{name}"), |b| {
                b.iter(|| {
                    for c in customers.values() {
                        let cx = Ctx::new(&c.state, &rules.state, &rules.symbols, now);
                        for r in &timed {
                            black_box(next(r, &cx, Some(r.program.holds(&cx))));
                        }
                    }
                })
            });
        }
        g.bench_function(format!("next_timer_{name}"), |b| {
            b.iter(|| {
                for c in customers.values_mut() {
                    // From scratch: without the per-rule cache a previous call filled.
                    c.clear_rule_timers(engine.counts());
                    black_box(engine.next_timer(c, now));
                }
            })
        });
        // One busy customer: a purchase and an email open every hour for 30 days, so every
        // window holds hundreds of buckets (what a search over them saves against a walk).
        let mut busy = engine.new_customer();
        let start = now - 30 * 86_400_000;
        for h in 0..720 {
            let ts = start + h * 3_600_000;
            for json in [
                format!(
                    r#"{{"customer_id":"busy","type":"purchase","timestamp":{ts},"amount":20,"category":"books","channel":"online"}}"#
                ),
                format!(
                    r#"{{"customer_id":"busy","type":"engagement","timestamp":{ts},"action":"email_open"}}"#
                ),
            ] {
                let ev = decode(json.as_bytes()).expect("a valid event");
                let _ = engine.apply(&mut busy, &ev, &mut Vec::new());
            }
        }
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("next_timer_busy_customer_{name}"), |b| {
            b.iter(|| {
                busy.clear_rule_timers(engine.counts());
                black_box(engine.next_timer(&mut busy, now))
            })
        });
    }
    g.finish();
}

fn engine_step(c: &mut Criterion) {
    let rules = Arc::new(RuleSet::embedded_default());
    let bytes = input();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("decode_apply_diff", |b| {
        b.iter(|| {
            let engine = Engine::new(rules.clone());
            let mut customers = HashMap::new();
            let mut out = Vec::new();
            for e in &bytes {
                if let Ok(ev) = decode(e) {
                    let c = customers
                        .entry(ev.customer_id.to_string())
                        .or_insert_with(|| engine.new_customer());
                    let _ = engine.apply(c, &ev, &mut out);
                    out.clear();
                }
            }
            black_box(customers.len())
        })
    });
    g.finish();
}

/// The customers the engine builds from [`input`], handing each event's customer id and
/// changes to `each`.
fn replay<'r>(
    engine: &'r Engine,
    mut each: impl FnMut(&str, Vec<Change<'r>>),
) -> HashMap<String, Customer> {
    let mut customers = HashMap::new();
    for b in &input() {
        if let Ok(ev) = decode(b) {
            let c = customers
                .entry(ev.customer_id.to_string())
                .or_insert_with(|| engine.new_customer());
            let mut out = Vec::new();
            let _ = engine.apply(c, &ev, &mut out);
            each(&ev.customer_id, out);
        }
    }
    customers
}

/// Changelog records: every customer of the input encoded, then decoded (the restore path).
fn changelog(c: &mut Criterion) {
    let engine = Engine::new(Arc::new(RuleSet::embedded_default()));
    let customers = replay(&engine, |_, _| {});
    let offsets = [1_000, -1, 7];
    let records: Vec<Vec<u8>> = customers
        .values()
        .map(|c| {
            let mut out = Vec::new();
            changelog::encode(&engine, c, 3, &offsets, &mut out);
            out
        })
        .collect();
    let mut g = c.benchmark_group("changelog");
    g.throughput(Throughput::Elements(customers.len() as u64));
    // Into one buffer, as the pipeline appends every body of a commit interval to one.
    let mut out = Vec::new();
    g.bench_function("encode", |b| {
        b.iter(|| {
            for c in customers.values() {
                out.clear();
                changelog::encode(&engine, c, 3, &offsets, &mut out);
                black_box(&out);
            }
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            for r in &records {
                let _ = black_box(changelog::decode(&engine, r));
            }
        })
    });
    g.finish();
}

/// Per change, what the pipeline adds to the engine's work: the message's JSON and the
/// metrics (counters, segment sizes, movements).
fn change_output(c: &mut Criterion) {
    let rules = Arc::new(RuleSet::embedded_default());
    let engine = Engine::new(rules.clone());
    let mut changes = Vec::new();
    replay(&engine, |id, out| {
        changes.extend(out.into_iter().map(|ch| (id.to_string(), ch)))
    });
    let cause = Cause::Event {
        event_id: Some("0b7c9a52-5f0e-4d8a-9a43-1d2f3e4a5b6c"),
        topic: "purchases",
        partition: 3,
        offset: 123_456,
    };
    let metrics = Metrics::new(&rules, &["purchases".to_string()]);
    let mut g = c.benchmark_group("change");
    g.throughput(Throughput::Elements(changes.len() as u64));
    g.bench_function("json", |b| {
        b.iter(|| {
            for (id, ch) in &changes {
                black_box(change_json(&rules, id, Cause::of(ch, cause), ch));
            }
        })
    });
    g.bench_function("metrics", |b| {
        b.iter(|| {
            for (_, ch) in &changes {
                metrics.change(ch);
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    decode_events,
    state_update,
    rule_evaluation,
    engine_step,
    changelog,
    change_output
);
criterion_main!(benches);
