//! The rules file: loading, validation and compilation into a [`RuleSet`].
//!
//! This module owns the rules file format (TOML: `[features]`, `[attributes]`,
//! `[[segmentation]]`, `[[segment]]`) and the error report: a bad file is refused with every
//! problem listed as `file:line:column: rule "name": reason`, never at event time.
//! Expression syntax lives in [`parse`], typing and the reference evaluation in [`compile`],
//! the evaluation the engine runs in [`program`], the timer analysis in [`timing`].

pub mod compile;
pub mod explain;
#[cfg(test)]
mod gen;
pub mod parse;
pub mod program;
pub mod timing;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::state::{AttrType, StateConfig, Window, MAX_ATTRIBUTES};
use crate::symbols::Symbols;
use crate::time::{parse_duration, HOUR_MS};
use compile::{deps, Atom, Compiler, Expr};

/// The most rules (segments, in segmentations or not) a rules file may have: a customer's
/// rule words (a 16-bit segment index per segmentation, a bit per independent segment, a
/// 32-bit timer cache entry per time-dependent rule) then always fit the 16-bit count of
/// [`crate::activity::Activity`]'s words (about 0.8 words of 64 bits per rule at most, so
/// up to 40 000 rules would fit).
pub const MAX_RULES: usize = 16_384;

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub description: Option<String>,
    pub source: String,
    pub expr: Expr,
    /// `expr` compiled for evaluation ([`program`]): what the engine runs.
    pub program: Arc<program::Program>,
    /// `expr`'s timer analysis compiled ([`timing::Timing`]): what the engine runs.
    pub timing: Arc<timing::Timing>,
    pub deps: u8,
    /// This rule's slot in a customer's per-rule timer cache (time-dependent rules only;
    /// see `engine::RuleTimers`), assigned when the rule set is built.
    pub timer_slot: Option<u16>,
    pub atoms: Vec<Atom>,
    /// The condition split into its sub-conditions, for explanations.
    pub condition: explain::Condition,
}

/// An ordered list of mutually exclusive segments: the first rule that holds wins, otherwise
/// the default.
#[derive(Debug, Clone)]
pub struct Segmentation {
    pub name: String,
    pub description: Option<String>,
    pub segments: Vec<Rule>,
    pub default: String,
    /// Union of the segments' dependencies.
    pub deps: u8,
    /// The atoms of every segment in rule order, each text once: what a change shows in
    /// `because` (the values of the rules evaluated to pick the winner).
    pub atoms: Vec<Atom>,
    /// Per segment index (the default last), how many of `atoms` the rules up to it have
    /// (see [`Self::atoms_upto`]).
    shown_counts: Vec<usize>,
}

impl Segmentation {
    /// A segmentation of `segments` (in order) with `default` as the fallback.
    pub fn new(
        name: String,
        description: Option<String>,
        segments: Vec<Rule>,
        default: String,
    ) -> Self {
        let deps = segments.iter().fold(0, |d, r| d | r.deps);
        let mut atoms: Vec<Atom> = Vec::new();
        let mut shown_counts = Vec::with_capacity(segments.len() + 1);
        for r in &segments {
            for a in &r.atoms {
                if !atoms.iter().any(|x| x.text == a.text) {
                    atoms.push(a.clone());
                }
            }
            shown_counts.push(atoms.len());
        }
        shown_counts.push(atoms.len());
        Segmentation {
            name,
            description,
            segments,
            default,
            deps,
            atoms,
            shown_counts,
        }
    }

    /// The atoms a change to segment `i` shows (see [`Self::atoms`]).
    pub fn atoms_upto(&self, i: usize) -> &[Atom] {
        let n = self
            .shown_counts
            .get(i)
            .copied()
            .unwrap_or(self.atoms.len());
        &self.atoms[..n]
    }

    /// Segment names, indexable by the segment index; the default is last.
    pub fn segment_name(&self, i: usize) -> &str {
        self.segments
            .get(i)
            .map_or(self.default.as_str(), |r| r.name.as_str())
    }
    pub fn default_index(&self) -> usize {
        self.segments.len()
    }
    pub fn index_of(&self, name: &str) -> Option<usize> {
        if name == self.default {
            return Some(self.default_index());
        }
        self.segments.iter().position(|r| r.name == name)
    }
}

/// Every rule, compiled, with the state layout they read.
#[derive(Debug)]
pub struct RuleSet {
    /// Short hash of the rules file contents, stamped on every change.
    pub version: String,
    pub state: StateConfig,
    pub segmentations: Vec<Segmentation>,
    pub segments: Vec<Rule>,
    pub symbols: Arc<Symbols>,
    /// Per slot of a customer's per-rule timer cache (one per time-dependent rule, see
    /// `Rule::timer_slot`), the rule's dependencies.
    pub timer_slot_deps: Vec<u8>,
    /// The names and version as JSON strings, for the change serializer.
    pub names: crate::output::Names,
}

/// One problem in a rules file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// `segmentation/segment`, `segment` or a section name.
    pub rule: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(r) = &self.rule {
            write!(f, "rule \"{r}\": ")?;
        }
        f.write_str(&self.message)
    }
}

/// A refused rules file: every problem found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct RulesError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} problem{} in the rules:",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeaturesDef {
    #[serde(default = "default_windows")]
    windows: Vec<toml::Spanned<String>>,
    #[serde(default = "default_bucket")]
    bucket: toml::Spanned<String>,
}

fn default_windows() -> Vec<toml::Spanned<String>> {
    ["7d", "30d", "90d"]
        .iter()
        .map(|w| toml::Spanned::new(0..0, w.to_string()))
        .collect()
}

fn default_bucket() -> toml::Spanned<String> {
    toml::Spanned::new(0..0, "1h".to_string())
}

impl Default for FeaturesDef {
    fn default() -> Self {
        FeaturesDef {
            windows: default_windows(),
            bucket: default_bucket(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SegmentDef {
    name: toml::Spanned<String>,
    when: toml::Spanned<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SegmentationDef {
    name: toml::Spanned<String>,
    default: toml::Spanned<String>,
    description: Option<String>,
    #[serde(default, rename = "segment")]
    segments: Vec<SegmentDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    features: FeaturesDef,
    #[serde(default)]
    attributes: BTreeMap<String, toml::Spanned<String>>,
    #[serde(default, rename = "segmentation")]
    segmentations: Vec<SegmentationDef>,
    #[serde(default, rename = "segment")]
    segments: Vec<SegmentDef>,
}

/// FNV-1a, 64 bit: a stable content hash for `rules_version` (not for security).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Reporter<'a> {
    file: &'a str,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Reporter<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    fn at(&mut self, offset: usize, rule: Option<&str>, message: impl Into<String>) {
        let (line, column) = self.line_col(offset);
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line,
            column,
            rule: rule.map(str::to_owned),
            message: message.into(),
        });
    }

    /// Byte offset in the file where the text of a TOML string value starts.
    fn string_body_start(&self, span: &std::ops::Range<usize>) -> usize {
        let raw = self.text.get(span.start..).unwrap_or("");
        let skip = if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
            let after = &raw[3..];
            3 + if after.starts_with("\r\n") {
                2
            } else if after.starts_with('\n') {
                1
            } else {
                0
            }
        } else {
            1
        };
        span.start + skip
    }
}

impl RuleSet {
    /// Loads and compiles a rules file.
    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => RuleSet::from_toml(&file, &text),
            Err(e) => Err(RulesError {
                problems: vec![Problem {
                    file,
                    line: 0,
                    column: 0,
                    rule: None,
                    message: format!("cannot read the rules file: {e}"),
                }],
            }),
        }
    }

    /// Compiles rules from TOML text; `file` is used in problem reports only.
    pub fn from_toml(file: &str, text: &str) -> Result<RuleSet, RulesError> {
        let mut rep = Reporter {
            file,
            text,
            problems: Vec::new(),
        };
        let def: RulesFile = match toml::from_str(text) {
            Ok(d) => d,
            Err(e) => {
                let offset = e.span().map_or(0, |s| s.start);
                rep.at(offset, None, format!("invalid rules file: {}", e.message()));
                return Err(RulesError {
                    problems: rep.problems,
                });
            }
        };

        // [features]
        let bucket_ms = match parse_duration(def.features.bucket.get_ref()) {
            Some(ms) if ms > 0 => ms,
            _ => {
                rep.at(
                    def.features.bucket.span().start,
                    Some("features.bucket"),
                    format!(
                        "invalid duration {:?} (use e.g. 1h, 1d)",
                        def.features.bucket.get_ref()
                    ),
                );
                HOUR_MS
            }
        };
        let mut windows = Vec::new();
        for w in &def.features.windows {
            let name = w.get_ref();
            match parse_duration(name) {
                Some(ms) if ms > 0 && ms % bucket_ms == 0 => {
                    if windows.iter().any(|x: &Window| x.name == *name) {
                        rep.at(
                            w.span().start,
                            Some("features.windows"),
                            format!("window {name:?} listed twice"),
                        );
                    }
                    windows.push(Window {
                        name: name.clone(),
                        ms,
                    });
                }
                Some(ms) if ms > 0 => rep.at(
                    w.span().start,
                    Some("features.windows"),
                    format!(
                        "window {name:?} is not a multiple of the bucket {:?}",
                        def.features.bucket.get_ref()
                    ),
                ),
                _ => rep.at(
                    w.span().start,
                    Some("features.windows"),
                    format!("invalid window {name:?} (use e.g. 7d, 30d, 12h)"),
                ),
            }
            if !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                rep.at(w.span().start, Some("features.windows"), format!("window {name:?} must be letters and digits only (it becomes part of a feature name)"));
            }
        }
        let max_buckets = windows.iter().map(|w| w.ms / bucket_ms).max().unwrap_or(0);
        if max_buckets > 100_000 {
            rep.at(0, Some("features"), format!("the longest window spans {max_buckets} buckets; use a wider bucket (at most 100000 buckets)"));
        }

        // [attributes]
        if def.attributes.len() > MAX_ATTRIBUTES {
            rep.at(
                0,
                Some("attributes"),
                format!(
                    "{} attributes declared; at most {MAX_ATTRIBUTES}",
                    def.attributes.len()
                ),
            );
        }
        let mut attributes = Vec::new();
        for (name, ty) in &def.attributes {
            match AttrType::parse(ty.get_ref()) {
                Some(t) => attributes.push((name.clone(), t)),
                None => rep.at(
                    ty.span().start,
                    Some(&format!("attributes.{name}")),
                    format!(
                        "unknown attribute type {:?} (use \"number\", \"string\" or \"bool\")",
                        ty.get_ref()
                    ),
                ),
            }
        }
        let state = StateConfig {
            bucket_ms,
            windows,
            attributes,
        };
        let symbols = Arc::new(Symbols::new());

        let compile_rule =
            |rep: &mut Reporter<'_>, qualified: &str, def: &SegmentDef| -> Option<Rule> {
                let src = def.when.get_ref();
                let base = rep.string_body_start(&def.when.span());
                let node = match parse::parse(src) {
                    Ok(n) => n,
                    Err(e) => {
                        rep.at(
                            base + e.at,
                            Some(qualified),
                            format!(
                                "syntax error at column {} of the condition: {}",
                                src[..e.at.min(src.len())].chars().count() + 1,
                                e.message
                            ),
                        );
                        return None;
                    }
                };
                match Compiler::new(&state, &symbols, src).compile_condition(&node) {
                    Ok((expr, atoms)) => {
                        let program = Arc::new(program::Program::new(&expr));
                        let expr = expr.mark_static();
                        Some(Rule {
                            name: def.name.get_ref().clone(),
                            description: def.description.clone(),
                            source: src.clone(),
                            deps: expr.deps(),
                            timer_slot: None,
                            program,
                            timing: Arc::new(timing::Timing::new(&expr)),
                            expr,
                            atoms,
                            condition: explain::Condition::build(&node, src, &state, &symbols),
                        })
                    }
                    Err(errors) => {
                        for e in errors {
                            let col = src[..e.span.start.min(src.len())].chars().count() + 1;
                            rep.at(
                                base + e.span.start,
                                Some(qualified),
                                format!("{} (column {col} of the condition)", e.message),
                            );
                        }
                        None
                    }
                }
            };

        let check_name = |rep: &mut Reporter<'_>,
                          name: &toml::Spanned<String>,
                          seen: &mut HashSet<String>,
                          what: &str| {
            let n = name.get_ref();
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                rep.at(
                    name.span().start,
                    Some(n),
                    format!("invalid {what} name {n:?} (letters, digits, _ - . only)"),
                );
            }
            if !seen.insert(n.clone()) {
                rep.at(
                    name.span().start,
                    Some(n),
                    format!("duplicate {what} name {n:?}"),
                );
            }
        };

        let mut segmentations = Vec::new();
        let mut seen_segmentations = HashSet::new();
        for sd in &def.segmentations {
            check_name(&mut rep, &sd.name, &mut seen_segmentations, "segmentation");
            let mut seen = HashSet::new();
            let mut rules = Vec::new();
            if sd.segments.is_empty() {
                rep.at(
                    sd.name.span().start,
                    Some(sd.name.get_ref()),
                    "a segmentation needs at least one [[segmentation.segment]]",
                );
            }
            for s in &sd.segments {
                let qualified = format!("{}/{}", sd.name.get_ref(), s.name.get_ref());
                check_name(&mut rep, &s.name, &mut seen, "segment");
                if let Some(r) = compile_rule(&mut rep, &qualified, s) {
                    rules.push(r);
                }
            }
            check_name(&mut rep, &sd.default, &mut seen, "segment (default)");
            if rules.len() > u16::MAX as usize - 2 {
                rep.at(
                    sd.name.span().start,
                    Some(sd.name.get_ref()),
                    "too many segments",
                );
            }
            segmentations.push(Segmentation::new(
                sd.name.get_ref().clone(),
                sd.description.clone(),
                rules,
                sd.default.get_ref().clone(),
            ));
        }
        let mut segments = Vec::new();
        let mut seen = HashSet::new();
        for s in &def.segments {
            check_name(&mut rep, &s.name, &mut seen, "segment");
            if let Some(r) = compile_rule(&mut rep, s.name.get_ref(), s) {
                segments.push(r);
            }
        }
        if def.segmentations.is_empty() && def.segments.is_empty() {
            rep.at(
                0,
                None,
                "no rules: define at least one [[segmentation]] or [[segment]]",
            );
        }
        let rule_count = def.segments.len()
            + def
                .segmentations
                .iter()
                .map(|s| s.segments.len())
                .sum::<usize>();
        if rule_count > MAX_RULES {
            rep.at(
                0,
                None,
                format!("{rule_count} rules (segments); at most {MAX_RULES}"),
            );
        }
        if !rep.problems.is_empty() {
            return Err(RulesError {
                problems: rep.problems,
            });
        }
        let mut slot_deps = Vec::new();
        let rules = segmentations
            .iter_mut()
            .flat_map(|s| s.segments.iter_mut())
            .chain(segments.iter_mut());
        for r in rules.filter(|r| r.deps & deps::TIME != 0) {
            r.timer_slot = u16::try_from(slot_deps.len()).ok();
            if r.timer_slot.is_some() {
                slot_deps.push(r.deps);
            }
        }
        let version = format!("{:08x}", fnv1a(text.as_bytes()) >> 32);
        Ok(RuleSet {
            names: crate::output::Names::new(&version, &segmentations, &segments),
            version,
            state,
            segmentations,
            segments,
            symbols,
            timer_slot_deps: slot_deps,
        })
    }

    /// The default rules shipped in `config/segments.toml`, embedded in the binary.
    pub fn embedded_default() -> RuleSet {
        match RuleSet::from_toml("config/segments.toml (embedded)", DEFAULT_RULES) {
            Ok(r) => r,
            Err(e) => panic!(
                "the embedded default rules do not compile (a build defect, caught by tests): {e}"
            ),
        }
    }
}

/// The default rules file, embedded so `microseg demo` runs from any directory.
pub const DEFAULT_RULES: &str = include_str!("../../config/segments.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_shows_the_atoms_of_the_rules_up_to_it_each_once() {
        let r = RuleSet::embedded_default();
        let lifecycle = &r.segmentations[0];
        let texts = |i: usize| -> Vec<&str> {
            lifecycle
                .atoms_upto(i)
                .iter()
                .map(|a| a.text.as_str())
                .collect()
        };
        let lapsed = ["purchases.count", "days_since(purchases.last)"];
        assert_eq!(texts(0), lapsed);
        // `at_risk` adds what `lapsed` did not read; `purchases.count` is shown once.
        let at_risk = [&lapsed[..], &["purchases.count_30d"]].concat();
        assert_eq!(texts(1), at_risk);
        let champion = [
            &at_risk[..],
            &["purchases.count_90d", "purchases.spend_90d"],
        ]
        .concat();
        assert_eq!(texts(2), champion);
        // `active` reads nothing new.
        let all = [&champion[..], &["days_since(purchases.first)"]].concat();
        assert_eq!(texts(4), all);
        // The default: every rule was evaluated.
        assert_eq!(texts(lifecycle.default_index()), all);
    }

    #[test]
    fn time_independent_parts_of_loaded_rules_are_marked_static() {
        let r = RuleSet::from_toml(
            "t.toml",
            "[[segment]]\nname = \"s\"\nwhen = \"purchases.count > 0 && days_since(purchases.last) > 60\"\n\n[[segment]]\nname = \"n\"\nwhen = \"purchases.count > 2\"\n",
        )
        .unwrap();
        let Expr::And(left, right) = &r.segments[0].expr else {
            panic!("{:?}", r.segments[0].expr)
        };
        assert!(matches!(**left, Expr::Static(_)), "{left:?}");
        assert!(matches!(**right, Expr::Cmp(..)) && right.has_time());
        assert!(r.segments[0].expr.has_time());
        // A rule with no time at all is one static node.
        assert!(!r.segments[1].expr.has_time());
        assert_eq!(r.segments[1].deps & compile::deps::TIME, 0);
    }

    #[test]
    fn default_rules_compile() {
        let r = RuleSet::embedded_default();
        assert!(!r.segmentations.is_empty());
        assert!(!r.segments.is_empty());
        assert_eq!(r.version.len(), 8);
    }

    #[test]
    fn every_problem_is_reported_with_rule_and_position() {
        let text = r#"
[attributes]
industry = "string"

[[segmentation]]
name = "lifecycle"
default = "other"
  [[segmentation.segment]]
  name = "typo"
  when = "purchases.cnt >= 3"
  [[segmentation.segment]]
  name = "broken"
  when = "purchases.count >= "

[[segment]]
name = "mistyped"
when = 'attr.industry > 5 && purchases.count == "x"'
"#;
        let e = RuleSet::from_toml("t.toml", text).unwrap_err();
        let lines: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert_eq!(lines[0], "t.toml:10:11: rule \"lifecycle/typo\": unknown feature `purchases.cnt` (column 1 of the condition)");
        assert!(
            lines[1]
                .starts_with("t.toml:13:30: rule \"lifecycle/broken\": syntax error at column 20"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("rule \"mistyped\": cannot compare a string with a number"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].contains("rule \"mistyped\": cannot compare a number with a string"),
            "{}",
            lines[3]
        );
    }

    #[test]
    fn structural_problems() {
        let text = r#"
[features]
windows = ["7d", "5x", "90m"]
bucket = "1h"
[attributes]
size = "integer"
[[segment]]
name = "a"
when = "true"
[[segment]]
name = "a"
when = "1 + 1"
"#;
        let e = RuleSet::from_toml("t.toml", text).unwrap_err();
        let all = e.to_string();
        assert!(all.contains("invalid window \"5x\""), "{all}");
        assert!(
            all.contains("\"90m\" is not a multiple of the bucket"),
            "{all}"
        );
        assert!(all.contains("unknown attribute type \"integer\""), "{all}");
        assert!(all.contains("duplicate segment name \"a\""), "{all}");
        assert!(
            all.contains("a rule must be a condition (bool), this is a number"),
            "{all}"
        );
        let many: String = (0..=MAX_ATTRIBUTES)
            .map(|i| format!("a{i} = \"number\"\n"))
            .collect();
        let text = format!("[attributes]\n{many}[[segment]]\nname = 'a'\nwhen = 'true'\n");
        let e = RuleSet::from_toml("t.toml", &text).unwrap_err().to_string();
        assert!(e.contains("4097 attributes declared; at most 4096"), "{e}");
        // Half in a segmentation, half (and one) on their own: both count.
        let rules = |kind: &str, n: usize| -> String {
            (0..n)
                .map(|i| format!("[[{kind}]]\nname = 's{i}'\nwhen = 'true'\n"))
                .collect()
        };
        let text = format!(
            "{}[[segmentation]]\nname = 'g'\ndefault = 'none'\n{}",
            rules("segment", MAX_RULES / 2 + 1),
            rules("segmentation.segment", MAX_RULES / 2)
        );
        let e = RuleSet::from_toml("t.toml", &text).unwrap_err().to_string();
        assert!(e.contains("16385 rules (segments); at most 16384"), "{e}");
        let unknown_key =
            RuleSet::from_toml("t.toml", "[[segment]]\nname='a'\nwhen='true'\nwhne='x'\n")
                .unwrap_err();
        assert!(
            unknown_key.to_string().contains("unknown field `whne`"),
            "{unknown_key}"
        );
    }
}
