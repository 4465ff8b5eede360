//! The HTTP API against a running engine (real broker, real HTTP requests on loopback).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{config, day, start, wait_for, Broker, Running};
use microseg::api::kafka_partition;
use microseg::rules::RuleSet;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
when = "purchases.count_30d >= 3 || purchases.spend_30d > 1000"
"#;

/// One HTTP/1.1 GET; returns the status and the body.
async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

async fn get_json(addr: &str, path: &str) -> (u16, Value) {
    let (status, body) = get(addr, path).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, v)
}

/// `promtool check metrics` (Debian package `prometheus`, installed by scripts/test.sh)
/// accepts the exposition: names, help texts, units and types follow the conventions.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is not installed: run scripts/test.sh, or apt-get install prometheus");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric the Grafana dashboard in deploy/ queries is one the engine exposes.
fn dashboard_queries_only_exposed_metrics(exposition: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("microseg_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for name in used {
        let family = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            exposition.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which is not exposed"
        );
    }
}

/// The engine plus its API on a free loopback port.
async fn serve(run: &Running) -> String {
    let listener = microseg::api::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(microseg::api::serve(
        listener,
        run.pipeline.clone(),
        std::future::pending(),
    ));
    addr
}

fn purchase(id: &str, c: &str, ts: i64, amount: f64) -> String {
    format!(
        r#"{{"event_id":"{id}","customer_id":"{c}","type":"purchase","timestamp":{ts},"amount":{amount}}}"#
    )
}

fn profile(id: &str, c: &str, ts: i64, industry: &str, size: u32) -> String {
    format!(
        r#"{{"event_id":"{id}","customer_id":"{c}","type":"profile","timestamp":{ts},"attributes":{{"industry":"{industry}","company_size":{size}}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_explanations_segments_and_errors_over_http() {
    let broker = Broker::start();
    broker.create_topics(&["events"], 3).await;
    let rules = Arc::new(RuleSet::from_toml("test.toml", RULES).unwrap());
    let mut cfg = config(&broker, "g-api", &["events"]);
    cfg.kafka
        .consumer
        .insert("statistics.interval.ms".into(), "500".into());
    let run = start(cfg, rules.clone());
    let addr = serve(&run).await;
    let p = run.pipeline.clone();
    wait_for("ready", Duration::from_secs(30), || p.ready()).await;
    let (status, ready) = get_json(&addr, "/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));

    // alice: a finance company of 900 that buys three times in a week; bob: one purchase.
    let prod = broker.producer();
    let mut placed = BTreeMap::new();
    // In time order: an event older than its partition's watermark would be late.
    for (c, json) in [
        ("alice", profile("a0", "alice", day(0), "finance", 900)),
        ("bob", profile("b0", "bob", day(0), "retail", 40)),
        ("alice", purchase("a1", "alice", day(1), 120.0)),
        ("alice", purchase("a2", "alice", day(3), 80.0)),
        ("bob", purchase("b1", "bob", day(4), 10.0)),
        ("alice", purchase("a3", "alice", day(5), 200.5)),
    ] {
        let part = broker.produce(&prod, "events", c, json.as_bytes()).await;
        placed.insert(c, part);
    }
    for (c, part) in &placed {
        assert_eq!(
            kafka_partition(c.as_bytes(), 3),
            *part,
            "{c}: murmur2 like the producer"
        );
    }
    let m = run.metrics.clone();
    wait_for("processed", Duration::from_secs(30), || {
        m.events_processed() == 6
    })
    .await;

    let (status, alice) = get_json(&addr, "/v1/customers/alice").await;
    assert_eq!(status, 200, "{alice}");
    assert_eq!(alice["segmentations"]["lifecycle"], "active");
    assert_eq!(
        alice["segments"],
        serde_json::json!(["enterprise_finance", "frequent"])
    );
    assert_eq!(alice["features"]["purchases.count_30d"], 3);
    assert_eq!(alice["features"]["attr.industry"], "finance");
    assert_eq!(alice["features"]["attr.company_size"], 900);
    assert_eq!(alice["partition"], placed["alice"]);
    assert_eq!(alice["state_at"], "2026-01-06T00:00:00Z");
    // prospect entered, then prospect → active (2), enterprise_finance, frequent.
    assert_eq!(alice["seq"], 5);

    let (_, why) = get_json(
        &addr,
        "/v1/customers/alice/explain?segment=enterprise_finance",
    )
    .await;
    assert_eq!(
        (why["member"].as_bool(), why["holds"].as_bool()),
        (Some(true), Some(true)),
        "{why}"
    );
    let tests = why["condition"]["all"].as_array().unwrap();
    assert_eq!(tests.len(), 2, "{why}");
    assert_eq!(tests[0]["test"], r#"attr.industry == "finance""#);
    assert_eq!(tests[0]["values"]["attr.industry"], "finance");
    assert_eq!(tests[1]["test"], "attr.company_size > 500");
    assert_eq!(tests[1]["held"], true);

    let (_, why) = get_json(&addr, "/v1/customers/bob/explain?segment=frequent").await;
    assert_eq!(
        (why["member"].as_bool(), why["holds"].as_bool()),
        (Some(false), Some(false)),
        "{why}"
    );
    let any = why["condition"]["any"].as_array().unwrap();
    assert_eq!(any[0]["test"], "purchases.count_30d >= 3");
    assert_eq!(any[0]["values"]["purchases.count_30d"], 1, "{why:#}");
    assert_eq!(any[1]["values"]["purchases.spend_30d"], 10);
    assert_eq!(any[1]["held"], false);

    // First match wins: `active` holds because `lapsed`, before it, does not.
    let (_, why) = get_json(
        &addr,
        "/v1/customers/alice/explain?segment=lifecycle/active",
    )
    .await;
    assert_eq!(
        (why["member"].as_bool(), why["holds"].as_bool()),
        (Some(true), Some(true)),
        "{why}"
    );
    assert_eq!(why["earlier_segments"][0]["segment"], "lapsed");
    assert_eq!(why["earlier_segments"][0]["held"], false);
    let (_, why) = get_json(&addr, "/v1/customers/alice/explain?segment=prospect").await;
    assert_eq!(
        (why["member"].as_bool(), why["holds"].as_bool()),
        (Some(false), Some(false)),
        "{why}"
    );
    assert_eq!(why["earlier_segments"].as_array().unwrap().len(), 2);

    let (_, sizes) = get_json(&addr, "/v1/segments").await;
    assert_eq!(sizes["customers"], 2);
    let lifecycle = &sizes["segmentations"][0]["segments"];
    let size = |n: &str| {
        lifecycle
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .unwrap()["members"]
            .clone()
    };
    assert_eq!(
        (size("active"), size("prospect")),
        (2.into(), 0.into()),
        "{sizes}"
    );
    assert_eq!(sizes["segments"][0]["members"], 1, "{sizes:#}");

    // Errors: JSON bodies with the reason.
    let (status, e) = get_json(&addr, "/v1/customers/nobody").await;
    assert_eq!(
        (status, e["error"].as_str()),
        (404, Some("unknown customer"))
    );
    assert_eq!(e["customer_id"], "nobody");
    let (status, e) = get_json(&addr, "/v1/customers/alice/explain").await;
    assert_eq!(status, 400);
    assert!(
        e["segments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "lifecycle/active"),
        "{e}"
    );
    let (status, e) = get_json(&addr, "/v1/customers/alice/explain?segment=vip").await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("unknown segment"))
    );
    let (status, _) = get_json(&addr, "/nope").await;
    assert_eq!(status, 404);
    let (status, health) = get_json(&addr, "/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));

    // The movement matrix counts exactly the published segmentation changes.
    let changes: Vec<Value> = broker
        .read(
            "segment-changes",
            8,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await
        .iter()
        .map(|r| r.json())
        .collect();
    let mut moves: BTreeMap<(String, String), u64> = BTreeMap::new();
    for c in changes
        .iter()
        .filter(|c| c["change"] == "entered" && c["segmentation"].is_string())
    {
        let from = c["previous"].as_str().unwrap_or("").to_owned();
        *moves
            .entry((from, c["segment"].as_str().unwrap().to_owned()))
            .or_default() += 1;
    }
    let (_, text) = get(&addr, "/metrics").await;
    let mut exposed: BTreeMap<(String, String), u64> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("microseg_movements_total{"))
    {
        let label = |k: &str| {
            let start = line.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
            line[start..].split('"').next().unwrap().to_owned()
        };
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        exposed.insert((label("from"), label("to")), n);
    }
    assert!(!moves.is_empty());
    assert_eq!(
        exposed, moves,
        "movement counter = change messages per from → to"
    );

    // The exposition: lag from librdkafka's statistics, state size, latency; promtool agrees.
    let sb = run.metrics.state_bytes.clone();
    wait_for("state size estimated", Duration::from_secs(10), || {
        sb.get() > 0
    })
    .await;
    // Set with the state's size, from the table the rules and the events interned into (the
    // events are all processed: the lag below is 0).
    let (dv, syms) = (run.metrics.distinct_values.clone(), rules.symbols.clone());
    wait_for("distinct values counted", Duration::from_secs(12), || {
        dv.get() == syms.len() as i64
    })
    .await;
    let mut text = String::new();
    for _ in 0..50 {
        text = get(&addr, "/metrics").await.1;
        if text.contains("microseg_consumer_lag_messages{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert_eq!(
        value("microseg_consumer_lag_messages{"),
        0.0,
        "all consumed"
    );
    assert!(value("microseg_change_latency_seconds_count") >= 5.0);
    assert!(value("microseg_state_bytes") > 100.0);
    assert_eq!(
        value("microseg_distinct_values"),
        rules.symbols.len() as f64
    );
    assert!(!rules.symbols.is_empty());
    promtool_accepts(&text);
    dashboard_queries_only_exposed_metrics(&text);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_of_another_instance_is_misdirected_not_missing() {
    let broker = Broker::start();
    broker.create_topics(&["events"], 4).await;
    let rules = Arc::new(RuleSet::from_toml("test.toml", RULES).unwrap());
    let a = start(config(&broker, "g-api2", &["events"]), rules.clone());
    let addr_a = serve(&a).await;
    // Not ready before the group assigned partitions (and restored them).
    let (status, v) = get_json(&addr_a, "/readyz").await;
    assert_eq!(status, 503, "{v}");
    assert_ne!(v["status"], "ready");
    let b = start(config(&broker, "g-api2", &["events"]), rules.clone());
    let (pa, pb) = (a.pipeline.clone(), b.pipeline.clone());
    wait_for("partitions split", Duration::from_secs(30), || {
        pa.ready() && pb.ready() && pa.assigned().len() + pb.assigned().len() == 4
    })
    .await;
    let addr_b = serve(&b).await;
    let (status, v) = get_json(&addr_a, "/readyz").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ready")), "{v}");
    let prod = broker.producer();
    let ids: Vec<String> = (0..12).map(|i| format!("cust-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        broker
            .produce(
                &prod,
                "events",
                id,
                purchase(&format!("e{i}"), id, day(1), 5.0).as_bytes(),
            )
            .await;
    }
    let (ma, mb) = (a.metrics.clone(), b.metrics.clone());
    wait_for("processed", Duration::from_secs(30), || {
        ma.events_processed() + mb.events_processed() == ids.len() as u64
    })
    .await;
    let mut misdirected = 0;
    for id in &ids {
        let part = kafka_partition(id.as_bytes(), 4);
        let (owner, other) = if pa.owns(part) {
            (&addr_a, &addr_b)
        } else {
            (&addr_b, &addr_a)
        };
        let (status, v) = get_json(owner, &format!("/v1/customers/{id}")).await;
        assert_eq!(status, 200, "{id} at its owner: {v}");
        let (status, v) = get_json(other, &format!("/v1/customers/{id}")).await;
        assert_eq!(status, 421, "{id} elsewhere: {v}");
        assert_eq!(v["partition"], part);
        misdirected += 1;
    }
    assert_eq!(misdirected, ids.len());
    a.stop().await;
    b.stop().await;
}

/// Readers never stall the event path: customers are requested in a tight loop while
/// thousands of events (and their timers) flow; everything gets processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_under_load_do_not_block_processing() {
    // A deadlock would stop the runtime itself, timeouts included: a thread outside it ends
    // the test binary with a message instead of letting it hang.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        if !watchdog.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("queries_under_load_do_not_block_processing: no progress in 120 s (deadlock between the API and the event path?)");
            std::process::exit(101);
        }
    });
    let broker = Broker::start();
    broker.create_topics(&["events"], 2).await;
    let rules = Arc::new(RuleSet::embedded_default());
    let run = start(config(&broker, "g-api-load", &["events"]), rules);
    let addr = serve(&run).await;
    let p = run.pipeline.clone();
    wait_for("ready", Duration::from_secs(30), || p.ready()).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..2 {
        let (addr, stop) = (addr.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut answered = 0u32;
            let mut i = r;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = if i % 2 == 0 {
                    format!("/v1/customers/c-{}", i % 50)
                } else {
                    format!(
                        "/v1/customers/c-{}/explain?segment=lifecycle/active",
                        i % 50
                    )
                };
                let (status, _) = get(&addr, &path).await;
                assert!(status == 200 || status == 404, "{path}: {status}");
                answered += 1;
                i += 2;
            }
            answered
        }));
    }
    let mut g = microseg::generate::Generator::new(3, 50, day(0), 30 * 60_000);
    let prod = broker.producer();
    let n = 3000;
    let sends: Vec<_> = (0..n)
        .map(|_| {
            let ev = g.next_event();
            prod.send_result(
                rdkafka::producer::FutureRecord::to("events")
                    .key(ev.customer_id.as_str())
                    .payload(ev.json.as_str()),
            )
            .unwrap_or_else(|(e, _)| panic!("{e}"))
        })
        .collect();
    for s in sends {
        s.await.unwrap().unwrap_or_else(|(e, _)| panic!("{e}"));
    }
    let m = run.metrics.clone();
    wait_for(
        "all processed while queried",
        Duration::from_secs(60),
        || m.events_processed() == n,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.await.unwrap() > 10, "the API answered throughout");
    }
    run.stop().await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
}
