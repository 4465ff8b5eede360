//! Application configuration: embedded defaults → TOML file → `MICROSEG_*` environment
//! variables, validated at start-up with every problem reported at once.
//!
//! This module owns the configuration file format (README "Configuration") and its
//! validation. The rules file it points to is loaded by [`crate::rules`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub group_id: String,
    pub client_id: String,
    /// Input topics (purchases, engagement, profiles…): the event type comes from each
    /// message, so any topic may carry any type. They must be co-partitioned by customer id.
    pub input_topics: Vec<String>,
    pub output_topic: String,
    pub dead_letter_topic: String,
    /// Compacted topic holding each customer's latest state, co-partitioned with the input;
    /// empty: `<group_id>-changelog`. Created at start-up if missing (whatever
    /// `create_topics` says: it must match the input's partition count).
    pub changelog_topic: String,
    /// Create the output and dead-letter topics at start-up if missing.
    pub create_topics: bool,
    /// Partitions for topics microseg creates.
    pub create_partitions: i32,
    /// Extra librdkafka properties for every client microseg opens (the consumers, the
    /// producer, the admin and metadata clients): connection and security settings.
    pub common: BTreeMap<String, String>,
    /// Extra librdkafka properties for the consumers (input and changelog restore) and the
    /// producer; they win over `common`.
    pub consumer: BTreeMap<String, String>,
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "microseg".into(),
            client_id: "microseg".into(),
            input_topics: vec!["purchases".into(), "engagement".into(), "profiles".into()],
            output_topic: "segment-changes".into(),
            dead_letter_topic: "microseg-dead-letters".into(),
            changelog_topic: String::new(),
            create_topics: true,
            create_partitions: 3,
            common: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Rules file; a relative path is relative to the config file's directory.
    pub file: PathBuf,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            file: PathBuf::from("segments.toml"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// How often offsets of fully delivered input are committed.
    pub commit_interval_ms: u64,
    /// On revocation and shutdown: how long to wait for in-flight output.
    pub drain_timeout_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            commit_interval_ms: 1000,
            drain_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `microseg=debug,rdkafka=warn`); `RUST_LOG` wins if set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the HTTP API listens (README "HTTP API"); empty: no HTTP server.
    pub address: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            address: "127.0.0.1:8080".into(),
        }
    }
}

/// What a crash may do to the output (README "Durability").
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Output, then changelog, then offsets: a crash may re-emit changes already emitted
    /// (same customer, seq and payload), never lose one.
    #[default]
    AtLeastOnce,
    /// Output, changelog and offsets in one Kafka transaction per commit interval (Kafka
    /// 2.5 or later); read the output with `isolation.level=read_committed`.
    ExactlyOnce,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    pub guarantee: Guarantee,
    /// Exactly-once: the producer's `transactional.id`; empty: `<group_id>-<client_id>`.
    /// Must be stable across restarts of one instance and distinct between instances.
    pub transactional_id: String,
}

/// Which clock drives time-based rules (README "Time").
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    /// Time advances with a per-partition watermark over event timestamps (replayable).
    #[default]
    Event,
    /// Time is the wall clock.
    Processing,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConfig {
    pub clock: ClockMode,
    /// Event time: how far behind the newest event of a partition an event may be and still
    /// count in windows (the watermark is the newest event time minus this).
    pub allowed_lateness_ms: i64,
    /// Event time: after this long (wall clock) without input on a partition, its watermark
    /// follows the wall clock, so timers of a quiet partition still fire.
    pub idle_timeout_ms: i64,
    /// Also copy late events (applied to lifetime aggregates only) to the dead-letter topic.
    pub late_to_dead_letter: bool,
    /// Event ids remembered per customer to drop duplicates (0: off).
    pub dedup_ids: usize,
    /// How often idle partitions and processing-time timers are checked.
    pub tick_ms: u64,
}

impl Default for TimeConfig {
    fn default() -> Self {
        TimeConfig {
            clock: ClockMode::Event,
            allowed_lateness_ms: 5 * 60_000,
            idle_timeout_ms: 30_000,
            late_to_dead_letter: false,
            dedup_ids: crate::engine::DEFAULT_DEDUP_IDS,
            tick_ms: 200,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub rules: RulesConfig,
    pub pipeline: PipelineConfig,
    pub processing: ProcessingConfig,
    pub time: TimeConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

/// A refused configuration, with every problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration {}:", self.file)?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Environment variables that override the file, and the field each one sets.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("MICROSEG_KAFKA_BROKERS", "kafka.brokers"),
    ("MICROSEG_KAFKA_GROUP_ID", "kafka.group_id"),
    ("MICROSEG_KAFKA_CLIENT_ID", "kafka.client_id"),
    (
        "MICROSEG_KAFKA_INPUT_TOPICS",
        "kafka.input_topics (comma-separated)",
    ),
    ("MICROSEG_KAFKA_OUTPUT_TOPIC", "kafka.output_topic"),
    (
        "MICROSEG_KAFKA_DEAD_LETTER_TOPIC",
        "kafka.dead_letter_topic",
    ),
    ("MICROSEG_KAFKA_CHANGELOG_TOPIC", "kafka.changelog_topic"),
    ("MICROSEG_PROCESSING_GUARANTEE", "processing.guarantee"),
    ("MICROSEG_HTTP_ADDRESS", "http.address"),
    ("MICROSEG_RULES_FILE", "rules.file"),
    ("MICROSEG_LOG_LEVEL", "log.level"),
    ("MICROSEG_LOG_FORMAT", "log.format"),
];

impl Config {
    /// Loads a config file, applies environment overrides and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("MICROSEG_"))
            .collect();
        Config::from_toml(&file, &text, &env)
    }

    /// Parses config text; `env` holds `MICROSEG_*` overrides. The rules path is resolved
    /// against the config file's directory.
    pub fn from_toml(
        file: &str,
        text: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            problems: vec![e.to_string().trim_end().replace('\n', "\n  ")],
        })?;
        let mut problems = Vec::new();
        for (k, v) in env {
            match k.as_str() {
                "MICROSEG_KAFKA_BROKERS" => cfg.kafka.brokers = v.clone(),
                "MICROSEG_KAFKA_GROUP_ID" => cfg.kafka.group_id = v.clone(),
                "MICROSEG_KAFKA_CLIENT_ID" => cfg.kafka.client_id = v.clone(),
                "MICROSEG_KAFKA_INPUT_TOPICS" => {
                    cfg.kafka.input_topics = v
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                }
                "MICROSEG_KAFKA_OUTPUT_TOPIC" => cfg.kafka.output_topic = v.clone(),
                "MICROSEG_KAFKA_DEAD_LETTER_TOPIC" => cfg.kafka.dead_letter_topic = v.clone(),
                "MICROSEG_KAFKA_CHANGELOG_TOPIC" => cfg.kafka.changelog_topic = v.clone(),
                "MICROSEG_PROCESSING_GUARANTEE" => match v.as_str() {
                    "at_least_once" => cfg.processing.guarantee = Guarantee::AtLeastOnce,
                    "exactly_once" => cfg.processing.guarantee = Guarantee::ExactlyOnce,
                    _ => problems.push(format!(
                        "MICROSEG_PROCESSING_GUARANTEE: {v:?} is not \"at_least_once\" or \"exactly_once\""
                    )),
                },
                "MICROSEG_HTTP_ADDRESS" => cfg.http.address = v.clone(),
                "MICROSEG_RULES_FILE" => cfg.rules.file = PathBuf::from(v),
                "MICROSEG_LOG_LEVEL" => cfg.log.level = v.clone(),
                "MICROSEG_LOG_FORMAT" => cfg.log.format = v.clone(),
                _ => problems.push(format!(
                    "unknown environment variable {k} (known: {})",
                    ENV_OVERRIDES
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
        if cfg.rules.file.is_relative() {
            if let Some(dir) = Path::new(file).parent() {
                cfg.rules.file = dir.join(&cfg.rules.file);
            }
        }
        cfg.validate(&mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError {
                file: file.to_owned(),
                problems,
            })
        }
    }

    /// The changelog topic's name (`kafka.changelog_topic`, or `<group_id>-changelog`).
    pub fn changelog_topic(&self) -> String {
        if self.kafka.changelog_topic.is_empty() {
            format!("{}-changelog", self.kafka.group_id)
        } else {
            self.kafka.changelog_topic.clone()
        }
    }

    /// The transactional id of the exactly-once producer.
    pub fn transactional_id(&self) -> String {
        if self.processing.transactional_id.is_empty() {
            format!("{}-{}", self.kafka.group_id, self.kafka.client_id)
        } else {
            self.processing.transactional_id.clone()
        }
    }

    fn validate(&self, problems: &mut Vec<String>) {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            problems.push("kafka.brokers: must not be empty".into());
        }
        if k.group_id.trim().is_empty() {
            problems.push("kafka.group_id: must not be empty".into());
        }
        if k.input_topics.is_empty() {
            problems.push("kafka.input_topics: list at least one topic".into());
        }
        for (i, t) in k.input_topics.iter().enumerate() {
            if k.input_topics[..i].contains(t) {
                problems.push(format!("kafka.input_topics: {t:?} listed twice"));
            }
        }
        let changelog = self.changelog_topic();
        for (name, t) in [
            ("output_topic", &k.output_topic),
            ("dead_letter_topic", &k.dead_letter_topic),
            ("changelog_topic", &changelog),
        ] {
            if t.is_empty() {
                problems.push(format!("kafka.{name}: must not be empty"));
            } else if k.input_topics.contains(t) {
                problems.push(format!(
                    "kafka.{name}: {t:?} is also an input topic (that would loop)"
                ));
            }
        }
        if changelog == k.output_topic || changelog == k.dead_letter_topic {
            problems.push(format!(
                "kafka.changelog_topic: {changelog:?} is also the output or dead-letter topic"
            ));
        }
        if k.create_partitions < 1 {
            problems.push("kafka.create_partitions: must be at least 1".into());
        }
        for key in k
            .common
            .keys()
            .chain(k.consumer.keys())
            .chain(k.producer.keys())
        {
            if matches!(
                key.as_str(),
                "bootstrap.servers"
                    | "group.id"
                    | "enable.auto.commit"
                    | "enable.auto.offset.store"
                    | "transactional.id"
            ) {
                problems.push(format!("kafka.common/consumer/producer: {key:?} is managed by microseg; set it through the [kafka] fields"));
            }
        }
        if self.pipeline.commit_interval_ms == 0 {
            problems.push("pipeline.commit_interval_ms: must be at least 1".into());
        }
        let t = &self.time;
        if t.allowed_lateness_ms < 0 {
            problems.push("time.allowed_lateness_ms: must not be negative".into());
        }
        if t.idle_timeout_ms < 1 {
            problems.push("time.idle_timeout_ms: must be at least 1".into());
        }
        if t.dedup_ids > crate::engine::MAX_DEDUP_IDS {
            problems.push(format!(
                "time.dedup_ids: must be at most {} (each customer keeps that many hashes)",
                crate::engine::MAX_DEDUP_IDS
            ));
        }
        if t.tick_ms == 0 || t.tick_ms > 1000 {
            problems.push(
                "time.tick_ms: must be between 1 and 1000 (timers fire within a tick)".into(),
            );
        }
        if !self.http.address.is_empty()
            && self.http.address.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!(
                "http.address: {:?} is not an address like \"127.0.0.1:8080\" (empty: no HTTP server)",
                self.http.address
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            problems.push(format!(
                "log.format: {:?} is not \"text\" or \"json\"",
                self.log.format
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_env_overrides() {
        let env = vec![
            ("MICROSEG_KAFKA_BROKERS".to_string(), "k:1".to_string()),
            (
                "MICROSEG_KAFKA_INPUT_TOPICS".to_string(),
                "a, b".to_string(),
            ),
        ];
        let c =
            Config::from_toml("config/microseg.toml", "[kafka]\ngroup_id = \"g\"\n", &env).unwrap();
        assert_eq!(c.kafka.brokers, "k:1");
        assert_eq!(c.kafka.group_id, "g");
        assert_eq!(c.kafka.input_topics, vec!["a", "b"]);
        assert_eq!(c.rules.file, PathBuf::from("config/segments.toml"));
    }

    #[test]
    fn every_problem_listed() {
        let text = "[kafka]\ninput_topics = [\"a\", \"a\"]\noutput_topic = \"a\"\ngroup_id = \"\"\n[pipeline]\ncommit_interval_ms = 0\n[log]\nformat = \"xml\"\n";
        let e =
            Config::from_toml("c.toml", text, &[("MICROSEG_NOPE".into(), "1".into())]).unwrap_err();
        assert_eq!(e.problems.len(), 6, "{e}");
        let unknown = Config::from_toml("c.toml", "[kafka]\nbrokerz = \"x\"\n", &[]).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `brokerz`"),
            "{unknown}"
        );
    }

    #[test]
    fn time_settings_are_validated() {
        let text = "[time]\nallowed_lateness_ms = -1\nidle_timeout_ms = 0\ntick_ms = 5000\ndedup_ids = 5000\n";
        let e = Config::from_toml("c.toml", text, &[]).unwrap_err();
        assert_eq!(e.problems.len(), 4, "{e}");
        for field in [
            "allowed_lateness_ms",
            "idle_timeout_ms",
            "tick_ms",
            "dedup_ids",
        ] {
            assert!(e.to_string().contains(field), "{e}");
        }
        let bad_clock = Config::from_toml("c.toml", "[time]\nclock = \"wall\"\n", &[]).unwrap_err();
        assert!(
            bad_clock.to_string().contains("unknown variant `wall`"),
            "{bad_clock}"
        );
        let ok = Config::from_toml("c.toml", "[time]\nclock = \"processing\"\n", &[]).unwrap();
        assert_eq!(ok.time.clock, ClockMode::Processing);
    }

    #[test]
    fn changelog_and_guarantee() {
        let c = Config::from_toml("c.toml", "[kafka]\ngroup_id = \"g\"\n", &[]).unwrap();
        assert_eq!(c.changelog_topic(), "g-changelog");
        assert_eq!(c.processing.guarantee, Guarantee::AtLeastOnce);
        assert_eq!(c.transactional_id(), "g-microseg");
        let text = "[kafka]\ninput_topics = [\"a\"]\nchangelog_topic = \"a\"\n[processing]\nguarantee = \"exactly-once\"\n";
        let e = Config::from_toml("c.toml", text, &[]).unwrap_err();
        assert!(
            e.to_string().contains("unknown variant `exactly-once`"),
            "{e}"
        );
        let text = "[kafka]\ninput_topics = [\"a\"]\nchangelog_topic = \"a\"\n";
        let e = Config::from_toml("c.toml", text, &[]).unwrap_err();
        assert!(e.to_string().contains("changelog_topic"), "{e}");
        let env = [(
            "MICROSEG_PROCESSING_GUARANTEE".to_string(),
            "exactly_once".to_string(),
        )];
        let c = Config::from_toml("c.toml", "", &env).unwrap();
        assert_eq!(c.processing.guarantee, Guarantee::ExactlyOnce);
    }

    #[test]
    fn managed_client_properties_are_refused_in_every_section() {
        let text = "[kafka.common]\n\"bootstrap.servers\" = \"x:1\"\n[kafka.consumer]\n\"group.id\" = \"g\"\n[kafka.producer]\n\"transactional.id\" = \"t\"\n";
        let e = Config::from_toml("c.toml", text, &[]).unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
        for key in ["bootstrap.servers", "group.id", "transactional.id"] {
            assert!(e.to_string().contains(key), "{e}");
        }
        let ok = "[kafka.common]\n\"security.protocol\" = \"ssl\"\n";
        let c = Config::from_toml("c.toml", ok, &[]).unwrap();
        assert_eq!(c.kafka.common["security.protocol"], "ssl");
    }

    #[test]
    fn shipped_config_is_valid() {
        let c = Config::from_toml(
            "config/microseg.toml",
            include_str!("../config/microseg.toml"),
            &[],
        )
        .unwrap();
        assert_eq!(c.rules.file, PathBuf::from("config/segments.toml"));
    }
}
