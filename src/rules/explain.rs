//! A rule's condition as a tree of its sub-conditions, for explanations ("why is this customer
//! (not) in this segment?").
//!
//! This module owns that tree: `&&` and `||` chains become `All` / `Any` lists, `!` a `Not`,
//! and every other boolean sub-expression is a `Test` with its source text, compiled on its
//! own, and the features it reads. Built once when the rules are loaded; evaluating it is
//! pure.

use serde_json::{json, Map, Value};

use super::compile::{val_to_json, Atom, Compiler, Ctx, Expr};
use super::parse::{Ast, BinOp, Node, UnOp};
use crate::state::StateConfig;
use crate::symbols::Symbols;

/// A condition, split at `&&`, `||` and `!`.
#[derive(Debug, Clone)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Test {
        text: String,
        expr: Expr,
        atoms: Vec<Atom>,
    },
}

impl Condition {
    /// The tree of a rule condition that compiled (so every part compiles too).
    pub(crate) fn build(node: &Node, src: &str, cfg: &StateConfig, syms: &Symbols) -> Condition {
        match &node.ast {
            Ast::Binary(op @ (BinOp::And | BinOp::Or), _, _) => {
                let mut parts = Vec::new();
                flatten(node, *op, &mut parts);
                let parts = parts
                    .into_iter()
                    .map(|n| Condition::build(n, src, cfg, syms))
                    .collect();
                if *op == BinOp::And {
                    Condition::All(parts)
                } else {
                    Condition::Any(parts)
                }
            }
            Ast::Unary(UnOp::Not, inner) => {
                Condition::Not(Box::new(Condition::build(inner, src, cfg, syms)))
            }
            _ => {
                let text = src
                    .get(node.span.start..node.span.end)
                    .unwrap_or("")
                    .to_owned();
                match Compiler::new(cfg, syms, src).compile_condition(node) {
                    Ok((expr, atoms)) => Condition::Test { text, expr, atoms },
                    // A part of a compiled rule always compiles; keep the text if not.
                    Err(_) => Condition::Test {
                        text,
                        expr: Expr::Lit(super::compile::Lit::Bool(false)),
                        atoms: Vec::new(),
                    },
                }
            }
        }
    }

    /// Evaluates every part at `cx`: `{"all"|"any": [...], "held": b}`, `{"not": ...,
    /// "held": b}` or `{"test": text, "held": b, "values": {feature: value}}`.
    pub fn explain(&self, cx: &Ctx<'_>) -> (bool, Value) {
        match self {
            Condition::All(parts) | Condition::Any(parts) => {
                let all = matches!(self, Condition::All(_));
                let (held, items): (Vec<bool>, Vec<Value>) =
                    parts.iter().map(|p| p.explain(cx)).unzip();
                let h = if all {
                    held.iter().all(|b| *b)
                } else {
                    held.iter().any(|b| *b)
                };
                (
                    h,
                    json!({ if all { "all" } else { "any" }: items, "held": h }),
                )
            }
            Condition::Not(inner) => {
                let (h, v) = inner.explain(cx);
                (!h, json!({"not": v, "held": !h}))
            }
            Condition::Test { text, expr, atoms } => {
                let held = expr.eval_bool(cx);
                let mut values = Map::new();
                for a in atoms {
                    values.insert(a.text.clone(), val_to_json(a.expr.eval(cx), cx.syms));
                }
                (held, json!({"test": text, "held": held, "values": values}))
            }
        }
    }
}

fn flatten<'n>(node: &'n Node, op: BinOp, out: &mut Vec<&'n Node>) {
    match &node.ast {
        Ast::Binary(o, l, r) if *o == op => {
            flatten(l, op, out);
            flatten(r, op, out);
        }
        _ => out.push(node),
    }
}
