//! Lexer and parser of the rule expression language: source text → untyped syntax tree with
//! byte spans. Type checking and feature resolution happen in `compile`.
//!
//! Grammar (lowest precedence first):
//! ```text
//! expr    := or
//! or      := and ( "||" and )*
//! and     := cmp ( "&&" cmp )*
//! cmp     := sum ( ("=="|"!="|"<"|"<="|">"|">=") sum | "in" sum | "not" "in" sum )?
//! sum     := product ( ("+"|"-") product )*
//! product := unary ( ("*"|"/") unary )*
//! unary   := ("!"|"-") unary | primary
//! primary := NUMBER | STRING | "true" | "false" | "(" expr ")" | "[" (expr ("," expr)*)? "]"
//!          | IDENT ("." IDENT)* | IDENT "(" (expr ("," expr)*)? ")"
//! ```
//! `and` / `or` / `not` are accepted as spellings of `&&` / `||` / `!`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Ident(String),
    Op(&'static str),
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Op(o) => write!(f, "`{o}`"),
            Tok::Eof => write!(f, "end of expression"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "||",
            BinOp::And => "&&",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::In => "in",
            BinOp::NotIn => "not in",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Not,
    Neg,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Ast {
    Num(f64),
    Str(String),
    Bool(bool),
    /// A dotted feature path such as `purchases.count_30d`.
    Path(String),
    Call(String, Vec<Node>),
    List(Vec<Node>),
    Unary(UnOp, Box<Node>),
    Binary(BinOp, Box<Node>, Box<Node>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub ast: Ast,
    pub span: Span,
}

/// A syntax error at a byte offset of the expression.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub at: usize,
    pub message: String,
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

const OPS: [&str; 18] = [
    "&&", "||", "==", "!=", "<=", ">=", "<", ">", "!", "+", "-", "*", "/", "(", ")", "[", "]", ",",
];

impl<'a> Lexer<'a> {
    fn next(&mut self) -> Result<(Tok, Span), SyntaxError> {
        let b = self.src.as_bytes();
        while self.pos < b.len() && b[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(&c) = b.get(self.pos) else {
            return Ok((Tok::Eof, Span { start, end: start }));
        };
        let tok = if c.is_ascii_digit()
            || (c == b'.' && b.get(self.pos + 1).is_some_and(u8::is_ascii_digit))
        {
            while self.pos < b.len()
                && (b[self.pos].is_ascii_digit() || b[self.pos] == b'.' || b[self.pos] == b'_')
            {
                self.pos += 1;
            }
            let text: String = self.src[start..self.pos]
                .chars()
                .filter(|&c| c != '_')
                .collect();
            let n = text.parse::<f64>().map_err(|_| SyntaxError {
                at: start,
                message: format!("malformed number `{}`", &self.src[start..self.pos]),
            })?;
            Tok::Num(n)
        } else if c == b'"' || c == b'\'' {
            self.pos += 1;
            let mut s = String::new();
            loop {
                let Some(ch) = self.src[self.pos..].chars().next() else {
                    return Err(SyntaxError {
                        at: start,
                        message: "unterminated string".into(),
                    });
                };
                self.pos += ch.len_utf8();
                if ch as u32 == c as u32 {
                    break;
                }
                if ch == '\\' {
                    let Some(esc) = self.src[self.pos..].chars().next() else {
                        return Err(SyntaxError {
                            at: start,
                            message: "unterminated string".into(),
                        });
                    };
                    self.pos += esc.len_utf8();
                    s.push(match esc {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    s.push(ch);
                }
            }
            Tok::Str(s)
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while self.pos < b.len() && (b[self.pos].is_ascii_alphanumeric() || b[self.pos] == b'_')
            {
                self.pos += 1;
            }
            match &self.src[start..self.pos] {
                "and" => Tok::Op("&&"),
                "or" => Tok::Op("||"),
                word => Tok::Ident(word.to_owned()),
            }
        } else if c == b'.' {
            self.pos += 1;
            Tok::Op(".")
        } else {
            let rest = &self.src[self.pos..];
            let Some(op) = OPS.iter().find(|op| rest.starts_with(**op)) else {
                let ch = rest.chars().next().unwrap_or('?');
                return Err(SyntaxError {
                    at: start,
                    message: format!("unexpected character `{ch}`"),
                });
            };
            self.pos += op.len();
            Tok::Op(op)
        };
        Ok((
            tok,
            Span {
                start,
                end: self.pos,
            },
        ))
    }
}

struct Parser<'a> {
    lex: Lexer<'a>,
    tok: Tok,
    span: Span,
}

type PResult = Result<Node, SyntaxError>;

impl<'a> Parser<'a> {
    fn bump(&mut self) -> Result<(Tok, Span), SyntaxError> {
        let (t, s) = self.lex.next()?;
        Ok((
            std::mem::replace(&mut self.tok, t),
            std::mem::replace(&mut self.span, s),
        ))
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(&self.tok, Tok::Op(o) if *o == op)
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(&self.tok, Tok::Ident(i) if i == w)
    }

    fn expect(&mut self, op: &str, what: &str) -> Result<Span, SyntaxError> {
        if self.is_op(op) {
            Ok(self.bump()?.1)
        } else {
            Err(SyntaxError {
                at: self.span.start,
                message: format!("expected {what}, found {}", self.tok),
            })
        }
    }

    fn binary(&mut self, lhs: Node, op: BinOp, next: fn(&mut Self) -> PResult) -> PResult {
        let rhs = next(self)?;
        let span = Span {
            start: lhs.span.start,
            end: rhs.span.end,
        };
        Ok(Node {
            ast: Ast::Binary(op, Box::new(lhs), Box::new(rhs)),
            span,
        })
    }

    fn or(&mut self) -> PResult {
        let mut lhs = self.and()?;
        while self.is_op("||") {
            self.bump()?;
            lhs = self.binary(lhs, BinOp::Or, Self::and)?;
        }
        Ok(lhs)
    }

    fn and(&mut self) -> PResult {
        let mut lhs = self.cmp()?;
        while self.is_op("&&") {
            self.bump()?;
            lhs = self.binary(lhs, BinOp::And, Self::cmp)?;
        }
        Ok(lhs)
    }

    fn cmp(&mut self) -> PResult {
        let lhs = self.sum()?;
        let op = match &self.tok {
            Tok::Op("==") => BinOp::Eq,
            Tok::Op("!=") => BinOp::Ne,
            Tok::Op("<") => BinOp::Lt,
            Tok::Op("<=") => BinOp::Le,
            Tok::Op(">") => BinOp::Gt,
            Tok::Op(">=") => BinOp::Ge,
            Tok::Ident(w) if w == "in" => BinOp::In,
            Tok::Ident(w) if w == "not" => {
                self.bump()?;
                if !self.is_word("in") {
                    return Err(SyntaxError {
                        at: self.span.start,
                        message: format!("expected `in` after `not`, found {}", self.tok),
                    });
                }
                BinOp::NotIn
            }
            _ => return Ok(lhs),
        };
        self.bump()?;
        let node = self.binary(lhs, op, Self::sum)?;
        if matches!(&self.tok, Tok::Op("==" | "!=" | "<" | "<=" | ">" | ">=")) || self.is_word("in")
        {
            return Err(SyntaxError {
                at: self.span.start,
                message: "comparisons do not chain; use && between them".into(),
            });
        }
        Ok(node)
    }

    fn sum(&mut self) -> PResult {
        let mut lhs = self.product()?;
        loop {
            let op = match &self.tok {
                Tok::Op("+") => BinOp::Add,
                Tok::Op("-") => BinOp::Sub,
                _ => return Ok(lhs),
            };
            self.bump()?;
            lhs = self.binary(lhs, op, Self::product)?;
        }
    }

    fn product(&mut self) -> PResult {
        let mut lhs = self.unary()?;
        loop {
            let op = match &self.tok {
                Tok::Op("*") => BinOp::Mul,
                Tok::Op("/") => BinOp::Div,
                _ => return Ok(lhs),
            };
            self.bump()?;
            lhs = self.binary(lhs, op, Self::unary)?;
        }
    }

    fn unary(&mut self) -> PResult {
        let op = if self.is_op("!") || self.is_word("not") {
            UnOp::Not
        } else if self.is_op("-") {
            UnOp::Neg
        } else {
            return self.primary();
        };
        let (_, s) = self.bump()?;
        let inner = self.unary()?;
        let span = Span {
            start: s.start,
            end: inner.span.end,
        };
        Ok(Node {
            ast: Ast::Unary(op, Box::new(inner)),
            span,
        })
    }

    fn list(&mut self, close: &str) -> Result<(Vec<Node>, Span), SyntaxError> {
        let mut items = Vec::new();
        if !self.is_op(close) {
            loop {
                items.push(self.or()?);
                if self.is_op(",") {
                    self.bump()?;
                } else {
                    break;
                }
            }
        }
        let end = self.expect(close, &format!("`,` or `{close}`"))?;
        Ok((items, end))
    }

    fn primary(&mut self) -> PResult {
        let (tok, span) = self.bump()?;
        match tok {
            Tok::Num(n) => Ok(Node {
                ast: Ast::Num(n),
                span,
            }),
            Tok::Str(s) => Ok(Node {
                ast: Ast::Str(s),
                span,
            }),
            Tok::Ident(w) if w == "true" || w == "false" => Ok(Node {
                ast: Ast::Bool(w == "true"),
                span,
            }),
            Tok::Ident(w) => {
                if self.is_op("(") {
                    self.bump()?;
                    let (args, end) = self.list(")")?;
                    return Ok(Node {
                        ast: Ast::Call(w, args),
                        span: Span {
                            start: span.start,
                            end: end.end,
                        },
                    });
                }
                let mut path = w;
                let mut end = span.end;
                while self.is_op(".") {
                    self.bump()?;
                    match self.bump()? {
                        (Tok::Ident(seg), s) => {
                            path.push('.');
                            path.push_str(&seg);
                            end = s.end;
                        }
                        (other, s) => {
                            return Err(SyntaxError {
                                at: s.start,
                                message: format!("expected a name after `.`, found {other}"),
                            })
                        }
                    }
                }
                Ok(Node {
                    ast: Ast::Path(path),
                    span: Span {
                        start: span.start,
                        end,
                    },
                })
            }
            Tok::Op("(") => {
                let inner = self.or()?;
                let end = self.expect(")", "`)`")?;
                Ok(Node {
                    ast: inner.ast,
                    span: Span {
                        start: span.start,
                        end: end.end,
                    },
                })
            }
            Tok::Op("[") => {
                let (items, end) = self.list("]")?;
                Ok(Node {
                    ast: Ast::List(items),
                    span: Span {
                        start: span.start,
                        end: end.end,
                    },
                })
            }
            other => Err(SyntaxError {
                at: span.start,
                message: format!("expected a value, found {other}"),
            }),
        }
    }
}

/// Parses one expression.
pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    let mut lex = Lexer { src, pos: 0 };
    let (tok, span) = lex.next()?;
    let mut p = Parser { lex, tok, span };
    let node = p.or()?;
    if p.tok != Tok::Eof {
        return Err(SyntaxError {
            at: p.span.start,
            message: format!("unexpected {} after a complete expression", p.tok),
        });
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: &Node) -> String {
        match &n.ast {
            Ast::Num(v) => format!("{v}"),
            Ast::Str(s) => format!("{s:?}"),
            Ast::Bool(b) => format!("{b}"),
            Ast::Path(p) => p.clone(),
            Ast::Call(f, a) => {
                format!("{f}({})", a.iter().map(shape).collect::<Vec<_>>().join(","))
            }
            Ast::List(a) => format!("[{}]", a.iter().map(shape).collect::<Vec<_>>().join(",")),
            Ast::Unary(UnOp::Not, x) => format!("!{}", shape(x)),
            Ast::Unary(UnOp::Neg, x) => format!("-{}", shape(x)),
            Ast::Binary(op, a, b) => format!("({} {} {})", shape(a), op.symbol(), shape(b)),
        }
    }

    #[test]
    fn precedence() {
        let n = parse("a.b + 2 * 3 > 4 && !c || d in [\"x\", 'y']").unwrap();
        assert_eq!(
            shape(&n),
            "((((a.b + (2 * 3)) > 4) && !c) || (d in [\"x\",\"y\"]))"
        );
        let n = parse("days_since(purchases.last) >= 60 and not x not in [1,2]").unwrap();
        assert_eq!(
            shape(&n),
            "((days_since(purchases.last) >= 60) && (!x not in [1,2]))"
        );
        assert_eq!(shape(&parse("-(1 - 2) / 4").unwrap()), "(-(1 - 2) / 4)");
    }

    #[test]
    fn spans_cover_source() {
        let src = "purchases.count >= 3";
        let n = parse(src).unwrap();
        let Ast::Binary(_, lhs, _) = &n.ast else {
            panic!()
        };
        assert_eq!(&src[lhs.span.start..lhs.span.end], "purchases.count");
        assert_eq!(
            n.span,
            Span {
                start: 0,
                end: src.len()
            }
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        for (src, at, msg) in [
            ("a >", 3, "expected a value"),
            ("(a > 1", 6, "expected `)`"),
            ("a > 1 b", 6, "unexpected `b`"),
            ("a == 'x", 5, "unterminated string"),
            ("a # b", 2, "unexpected character `#`"),
            ("1 < a < 3", 6, "do not chain"),
            ("f(1,", 4, "expected a value"),
        ] {
            let e = parse(src).unwrap_err();
            assert_eq!(e.at, at, "{src}: {e:?}");
            assert!(e.message.contains(msg), "{src}: {e:?}");
        }
    }
}
