//! The `microseg` binary as a user runs it: check-rules, generate, bench and demo.

use std::process::Command;

fn microseg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_microseg"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run microseg")
}

#[test]
fn check_rules_accepts_the_shipped_rules() {
    let out = microseg(&["check-rules", "config/segments.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn check_rules_lists_every_problem() {
    let out = microseg(&["check-rules", "tests/data/bad_rules.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 problems"), "{err}");
    assert!(err.contains("tests/data/bad_rules.toml:8:11: rule \"lifecycle/loyal\": unknown feature `purchases.lifetime_value`"), "{err}");
    assert!(
        err.contains(
            "tests/data/bad_rules.toml:12:34: rule \"lifecycle/active\": syntax error at column 24"
        ),
        "{err}"
    );
}

#[test]
fn check_rules_refuses_a_missing_file() {
    let out = microseg(&["check-rules", "no/such/file.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the rules file"));
}

#[test]
fn run_refuses_a_bad_config_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[kafka]\ninput_topics = []\noutput_topic = \"\"\n[log]\nformat = \"xml\"\n",
    )
    .unwrap();
    let out = microseg(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["kafka.input_topics", "kafka.output_topic", "log.format"] {
        assert!(err.contains(want), "missing {want} in {err}");
    }
}

#[test]
fn generate_prints_decodable_json_lines() {
    let out = microseg(&["generate", "--customers", "5", "--events", "50"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 50);
    for line in text.lines() {
        microseg::event::decode(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
}

#[test]
fn bench_quick_prints_one_json_line_per_measurement_with_the_machine() {
    let out = microseg(&[
        "bench",
        "--quick",
        "--customers",
        "2000",
        "--events",
        "6000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |m: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|v| v["measurement"] == m).collect()
    };
    let positive = |v: &serde_json::Value, field: &str| {
        assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "{field} in {v}")
    };
    positive(find("decode_only")[0], "decode_only_eps");
    let engine = find("engine");
    assert_eq!(engine.len(), 2, "default and heavy rules: {text}");
    for e in &engine {
        positive(e, "engine_eps");
        positive(e, "engine_vs_decode");
        positive(e, "changes");
        positive(e, "changes_by_timer");
        positive(e, "timers_fired");
        positive(e, "changelog_records_per_s");
        positive(e, "engine_with_changelog_eps");
        assert!(e["engine_with_changelog_eps"].as_f64() <= e["engine_eps"].as_f64());
        // Every customer the engine created was written to the changelog at least once.
        assert!(
            e["changelog_records"].as_u64() >= e["customers"].as_u64(),
            "{e}"
        );
    }
    assert_eq!(engine[1]["rules"], "heavy");
    assert!(engine[1]["rule_count"].as_u64().unwrap() >= 30);
    let memory = find("bytes_per_customer")[0];
    positive(memory, "bytes_per_customer");
    positive(memory, "bytes_per_customer_unreleased");
    // Returning the allocator's free memory can only lower the reading.
    assert!(
        memory["bytes_per_customer_unreleased"].as_u64() >= memory["bytes_per_customer"].as_u64(),
        "{memory}"
    );
    // Where the bytes go: the parts add up to their total, and every customer has an entry
    // and its rules' words.
    let held = &memory["held_per_customer"];
    let parts: f64 = held
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "total")
                .filter_map(|(_, v)| v.as_f64())
                .sum()
        })
        .unwrap_or(0.0);
    let total = held["total"].as_f64().unwrap_or(0.0);
    assert!((parts - total).abs() < 1.0, "{held}");
    positive(held, "entry");
    positive(held, "rule_words");
    // On the pipeline's workers, then fed directly on one core: every customer each time.
    for (m, workers) in [
        ("restore_in_memory", microseg::restore::workers(3) as u64),
        ("restore_in_memory_one_core", 0),
    ] {
        let restore = find(m);
        assert_eq!(restore.len(), 1, "{m}: {text}");
        assert_eq!(restore[0]["customers"], 2000, "{m}");
        assert_eq!(restore[0]["workers"], workers, "{m}");
        positive(restore[0], "restore_customers_per_s");
    }
    for v in &lines {
        assert!(v["machine"]["cores"].as_u64().unwrap() >= 1, "{v}");
        assert!(
            v["command"].as_str().unwrap().contains("bench --quick"),
            "{v}"
        );
    }
}

/// The demo on its embedded cluster: at the stop, every event produced was processed and
/// every change delivered was read back from the output topic.
#[test]
fn demo_processes_every_event_it_produced_and_reads_back_every_change() {
    let out = microseg(&["demo", "--duration", "4"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout
        .lines()
        .find(|l| l.starts_with("demo finished:"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    // "demo finished: produced P events, processed Q, dead-lettered D (…), changes E entered
    // / X exited, R change messages read back from the output topic"
    let n: Vec<u64> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let [produced, processed, dead, entered, exited, read_back] = n[..] else {
        panic!("unexpected summary: {last}");
    };
    assert!(produced > 5_000, "{last}");
    assert_eq!(processed, produced, "{last}");
    assert!(dead > 0 && entered > 0 && exited > 0, "{last}");
    assert_eq!(read_back, entered + exited, "{last}");
}
