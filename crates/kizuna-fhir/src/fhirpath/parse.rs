//! FHIRPath grammar: tokens, the syntax tree, and a precedence-climbing parser.

use rust_decimal::Decimal;
use std::str::FromStr;

use super::temporal::{DateTime, Time};
use super::FhirPathError;

/// A literal in an expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `{}`
    Empty,
    /// `true` / `false`
    Bool(bool),
    /// `'text'`
    Str(String),
    /// `42`
    Int(i64),
    /// `42L`
    Long(i64),
    /// `4.2`
    Dec(Decimal),
    /// `@2012-04-15`
    Date(DateTime),
    /// `@2012-04-15T10:00:00`
    DateTime(DateTime),
    /// `@T10:00`
    Time(Time),
    /// `4 'mg'` or `3 days`
    Quantity(Decimal, String),
}

/// A parsed FHIRPath expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal value.
    Literal(Literal),
    /// `$this`
    This,
    /// `$index`
    Index,
    /// `$total`
    Total,
    /// `%name`
    Var(String),
    /// An identifier at the start of a path (`Patient` or `name`).
    Ident(String),
    /// `expr.name`
    Member(Box<Expr>, String),
    /// `expr.fn(args)` or `fn(args)` (receiver `None`).
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    /// `expr[index]`
    Indexer(Box<Expr>, Box<Expr>),
    /// `-expr` / `+expr`
    Neg(Box<Expr>),
    /// A binary operator.
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `expr is Type`
    Is(Box<Expr>, String),
    /// `expr as Type`
    As(Box<Expr>, String),
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `div`
    IntDiv,
    /// `mod`
    Mod,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `&`
    Concat,
    /// `|`
    Union,
    /// `<`
    Lt,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `>=`
    Ge,
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `~`
    Equiv,
    /// `!~`
    NotEquiv,
    /// `in`
    In,
    /// `contains`
    Contains,
    /// `and`
    And,
    /// `or`
    Or,
    /// `xor`
    Xor,
    /// `implies`
    Implies,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Quoted(String),
    Str(String),
    Num(String),
    Long(i64),
    Date(String),
    Time(String),
    Var(String),
    Special(String),
    Op(&'static str),
    Eof,
}

struct Lexer<'s> {
    s: &'s str,
    pos: usize,
}

impl<'s> Lexer<'s> {
    fn err(&self, msg: &str) -> FhirPathError {
        FhirPathError::Syntax(format!("{msg} (位置/at {})", self.pos))
    }

    fn skip_ws(&mut self) -> Result<(), FhirPathError> {
        loop {
            let rest = &self.s[self.pos..];
            if let Some(c) = rest.chars().next() {
                if c.is_whitespace() {
                    self.pos += c.len_utf8();
                    continue;
                }
            }
            if rest.starts_with("//") {
                self.pos += rest.find('\n').unwrap_or(rest.len());
                continue;
            }
            if let Some(body) = rest.strip_prefix("/*") {
                match body.find("*/") {
                    Some(i) => self.pos += i + 4,
                    None => return Err(self.err("コメントが閉じていません / unterminated comment")),
                }
                continue;
            }
            return Ok(());
        }
    }

    fn quoted(&mut self, q: char) -> Result<String, FhirPathError> {
        let mut out = String::new();
        let mut chars = self.s[self.pos + 1..].char_indices();
        while let Some((i, c)) = chars.next() {
            if c == q {
                self.pos += i + 2;
                return Ok(out);
            }
            if c == '\\' {
                let Some((_, e)) = chars.next() else { break };
                match e {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'f' => out.push('\u{c}'),
                    '\\' | '/' | '\'' | '"' | '`' => out.push(e),
                    'u' => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next().map(|(_, c)| c))
                            .collect();
                        let cp = u32::from_str_radix(&hex, 16)
                            .map_err(|_| self.err("不正な \\u / bad \\u escape"))?;
                        out.push(
                            char::from_u32(cp)
                                .ok_or_else(|| self.err("不正な \\u / bad \\u escape"))?,
                        );
                    }
                    _ => return Err(self.err("不正なエスケープ / bad escape")),
                }
                continue;
            }
            out.push(c);
        }
        Err(self.err("文字列が閉じていません / unterminated string"))
    }

    fn next(&mut self) -> Result<Tok, FhirPathError> {
        self.skip_ws()?;
        let rest = &self.s[self.pos..];
        let Some(c) = rest.chars().next() else {
            return Ok(Tok::Eof);
        };
        if c == '\'' {
            return Ok(Tok::Str(self.quoted('\'')?));
        }
        if c == '`' {
            return Ok(Tok::Quoted(self.quoted('`')?));
        }
        if c == '@' {
            let body = scan_temporal(&rest[1..]);
            self.pos += 1 + body.len();
            return Ok(if let Some(t) = body.strip_prefix('T') {
                Tok::Time(t.to_string())
            } else {
                Tok::Date(body.to_string())
            });
        }
        if c == '%' {
            self.pos += 1;
            let r = &self.s[self.pos..];
            if r.starts_with('`') {
                return Ok(Tok::Var(self.quoted('`')?));
            }
            if r.starts_with('\'') {
                return Ok(Tok::Var(self.quoted('\'')?));
            }
            let name: String = r
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                return Err(self.err("% の後に名前がありません / missing name after %"));
            }
            self.pos += name.len();
            return Ok(Tok::Var(name));
        }
        if c == '$' {
            let name: String = rest[1..]
                .chars()
                .take_while(|c| c.is_alphanumeric())
                .collect();
            self.pos += 1 + name.len();
            return Ok(Tok::Special(name));
        }
        if c.is_ascii_digit() {
            let mut len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let b = rest.as_bytes();
            if b.get(len) == Some(&b'.') && b.get(len + 1).map(u8::is_ascii_digit).unwrap_or(false)
            {
                len += 1 + rest[len + 1..]
                    .bytes()
                    .take_while(u8::is_ascii_digit)
                    .count();
            } else if b.get(len) == Some(&b'L') {
                let n = rest[..len]
                    .parse()
                    .map_err(|_| self.err("整数が大きすぎます / integer too large"))?;
                self.pos += len + 1;
                return Ok(Tok::Long(n));
            }
            self.pos += len;
            return Ok(Tok::Num(rest[..len].to_string()));
        }
        if c.is_alphabetic() || c == '_' {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            self.pos += name.len();
            return Ok(Tok::Ident(name));
        }
        const OPS: &[&str] = &[
            "<=", ">=", "!=", "!~", "(", ")", "[", "]", "{", "}", ".", ",", "+", "-", "*", "/",
            "&", "|", "=", "~", "<", ">",
        ];
        for op in OPS {
            if rest.starts_with(op) {
                self.pos += op.len();
                return Ok(Tok::Op(op));
            }
        }
        Err(self.err(&format!("予期しない文字 / unexpected character '{c}'")))
    }
}

/// Parses a FHIRPath expression.
pub fn parse(src: &str) -> Result<Expr, FhirPathError> {
    let mut lx = Lexer { s: src, pos: 0 };
    let mut toks = Vec::new();
    loop {
        let t = lx.next()?;
        let eof = t == Tok::Eof;
        toks.push(t);
        if eof {
            break;
        }
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        nodes: 0,
    };
    let e = p.expr(0)?;
    if p.peek() != &Tok::Eof {
        return Err(FhirPathError::Syntax(format!(
            "式の後に余分な字句があります / unexpected token {:?}",
            p.peek()
        )));
    }
    Ok(e)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
    nodes: usize,
}

const MAX_DEPTH: usize = 200;
/// Operator and member chains build trees as deep as they are long; evaluation recurses over them.
const MAX_NODES: usize = 1000;

fn binop_info(t: &Tok) -> Option<(BinOp, u8)> {
    let (op, prec) = match t {
        Tok::Ident(s) => match s.as_str() {
            "implies" => (BinOp::Implies, 1),
            "or" => (BinOp::Or, 2),
            "xor" => (BinOp::Xor, 2),
            "and" => (BinOp::And, 3),
            "in" => (BinOp::In, 4),
            "contains" => (BinOp::Contains, 4),
            "div" => (BinOp::IntDiv, 10),
            "mod" => (BinOp::Mod, 10),
            _ => return None,
        },
        Tok::Op(o) => match *o {
            "=" => (BinOp::Eq, 5),
            "!=" => (BinOp::Ne, 5),
            "~" => (BinOp::Equiv, 5),
            "!~" => (BinOp::NotEquiv, 5),
            "<" => (BinOp::Lt, 6),
            ">" => (BinOp::Gt, 6),
            "<=" => (BinOp::Le, 6),
            ">=" => (BinOp::Ge, 6),
            "|" => (BinOp::Union, 7),
            "+" => (BinOp::Add, 9),
            "-" => (BinOp::Sub, 9),
            "&" => (BinOp::Concat, 9),
            "*" => (BinOp::Mul, 10),
            "/" => (BinOp::Div, 10),
            _ => return None,
        },
        _ => return None,
    };
    Some((op, prec))
}

/// Precedence of `is` and `as`.
const TYPE_PREC: u8 = 8;

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).unwrap_or(&Tok::Eof)
    }

    fn bump(&mut self) -> Tok {
        let t = self.peek().clone();
        self.pos += 1;
        t
    }

    fn expect_op(&mut self, op: &str) -> Result<(), FhirPathError> {
        match self.bump() {
            Tok::Op(o) if o == op => Ok(()),
            t => Err(FhirPathError::Syntax(format!(
                "'{op}' が必要です / expected '{op}', found {t:?}"
            ))),
        }
    }

    fn expr(&mut self, min_prec: u8) -> Result<Expr, FhirPathError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(FhirPathError::Syntax(
                "式が深すぎます / expression nested too deeply".into(),
            ));
        }
        let mut lhs = self.unary()?;
        loop {
            let t = self.peek().clone();
            if let Tok::Ident(s) = &t {
                if (s == "is" || s == "as") && TYPE_PREC >= min_prec {
                    self.bump();
                    let ty = self.type_spec()?;
                    lhs = if s == "is" {
                        Expr::Is(Box::new(lhs), ty)
                    } else {
                        Expr::As(Box::new(lhs), ty)
                    };
                    continue;
                }
            }
            let Some((op, prec)) = binop_info(&t) else {
                break;
            };
            if prec < min_prec {
                break;
            }
            self.bump();
            let rhs = self.expr(prec + 1)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn type_spec(&mut self) -> Result<String, FhirPathError> {
        let mut name = match self.bump() {
            Tok::Ident(s) | Tok::Quoted(s) => s,
            t => {
                return Err(FhirPathError::Syntax(format!(
                    "型名が必要です / expected a type name, found {t:?}"
                )))
            }
        };
        while self.peek() == &Tok::Op(".") {
            if let Some(Tok::Ident(n) | Tok::Quoted(n)) = self.toks.get(self.pos + 1).cloned() {
                self.pos += 2;
                name = format!("{name}.{n}");
            } else {
                break;
            }
        }
        Ok(name)
    }

    fn grow(&mut self) -> Result<(), FhirPathError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(FhirPathError::Syntax(
                "式が大きすぎます / expression too large".into(),
            ));
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, FhirPathError> {
        self.grow()?;
        match self.peek() {
            Tok::Op("-") => {
                self.bump();
                let e = self.unary()?;
                Ok(Expr::Neg(Box::new(e)))
            }
            Tok::Op("+") => {
                self.bump();
                self.unary()
            }
            _ => self.postfix(),
        }
    }

    fn postfix(&mut self) -> Result<Expr, FhirPathError> {
        let mut e = self.term()?;
        loop {
            self.grow()?;
            match self.peek() {
                Tok::Op(".") => {
                    self.bump();
                    let name = match self.bump() {
                        Tok::Ident(s) | Tok::Quoted(s) => s,
                        t => {
                            return Err(FhirPathError::Syntax(format!(
                                "'.' の後に名前が必要です / expected a name after '.', found {t:?}"
                            )))
                        }
                    };
                    if self.peek() == &Tok::Op("(") {
                        let args = self.args()?;
                        e = Expr::Call(Some(Box::new(e)), name, args);
                    } else {
                        e = Expr::Member(Box::new(e), name);
                    }
                }
                Tok::Op("[") => {
                    self.bump();
                    let idx = self.expr(0)?;
                    self.expect_op("]")?;
                    e = Expr::Indexer(Box::new(e), Box::new(idx));
                }
                _ => return Ok(e),
            }
        }
    }

    fn args(&mut self) -> Result<Vec<Expr>, FhirPathError> {
        self.expect_op("(")?;
        let mut args = Vec::new();
        if self.peek() == &Tok::Op(")") {
            self.bump();
            return Ok(args);
        }
        loop {
            args.push(self.expr(0)?);
            match self.bump() {
                Tok::Op(",") => continue,
                Tok::Op(")") => return Ok(args),
                t => {
                    return Err(FhirPathError::Syntax(format!(
                        "',' か ')' が必要です / expected ',' or ')', found {t:?}"
                    )))
                }
            }
        }
    }

    fn term(&mut self) -> Result<Expr, FhirPathError> {
        match self.bump() {
            Tok::Op("(") => {
                let e = self.expr(0)?;
                self.expect_op(")")?;
                Ok(e)
            }
            Tok::Op("{") => {
                self.expect_op("}")?;
                Ok(Expr::Literal(Literal::Empty))
            }
            Tok::Str(s) => Ok(Expr::Literal(Literal::Str(s))),
            Tok::Long(n) => Ok(Expr::Literal(Literal::Long(n))),
            Tok::Num(n) => {
                let unit = match self.peek().clone() {
                    Tok::Str(u) => {
                        self.bump();
                        Some(u)
                    }
                    Tok::Ident(u) if is_calendar_word(&u) => {
                        self.bump();
                        Some(u)
                    }
                    _ => None,
                };
                let bad = || FhirPathError::Syntax(format!("数値が不正です / invalid number {n}"));
                if let Some(u) = unit {
                    return Ok(Expr::Literal(Literal::Quantity(
                        Decimal::from_str(&n).map_err(|_| bad())?,
                        u,
                    )));
                }
                if n.contains('.') {
                    Ok(Expr::Literal(Literal::Dec(
                        Decimal::from_str(&n).map_err(|_| bad())?,
                    )))
                } else {
                    match n.parse::<i32>() {
                        Ok(i) => Ok(Expr::Literal(Literal::Int(i as i64))),
                        Err(_) => Ok(Expr::Literal(Literal::Dec(
                            Decimal::from_str(&n).map_err(|_| bad())?,
                        ))),
                    }
                }
            }
            Tok::Date(d) => {
                let dt = DateTime::parse(&d, true).ok_or_else(|| {
                    FhirPathError::Syntax(format!("日付が不正です / invalid date literal @{d}"))
                })?;
                if d.contains('T') {
                    Ok(Expr::Literal(Literal::DateTime(dt)))
                } else {
                    Ok(Expr::Literal(Literal::Date(dt)))
                }
            }
            Tok::Time(t) => {
                if t.contains('Z') || t.contains('+') || t.contains('-') {
                    return Err(FhirPathError::Execution(format!(
                        "時刻にタイムゾーンは使えません / a time literal has no time zone: @T{t}"
                    )));
                }
                let v = Time::parse(&t, true).ok_or_else(|| {
                    FhirPathError::Syntax(format!("時刻が不正です / invalid time literal @T{t}"))
                })?;
                Ok(Expr::Literal(Literal::Time(v)))
            }
            Tok::Var(v) => Ok(Expr::Var(v)),
            Tok::Special(s) => match s.as_str() {
                "this" => Ok(Expr::This),
                "index" => Ok(Expr::Index),
                "total" => Ok(Expr::Total),
                _ => Err(FhirPathError::Syntax(format!("不明な変数 / unknown ${s}"))),
            },
            Tok::Quoted(name) => Ok(Expr::Ident(name)),
            Tok::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::Literal(Literal::Bool(true))),
                "false" => Ok(Expr::Literal(Literal::Bool(false))),
                _ => {
                    if self.peek() == &Tok::Op("(") {
                        let args = self.args()?;
                        Ok(Expr::Call(None, name, args))
                    } else {
                        Ok(Expr::Ident(name))
                    }
                }
            },
            t => Err(FhirPathError::Syntax(format!(
                "予期しない字句 / unexpected token {t:?}"
            ))),
        }
    }
}

/// The longest prefix of `s` shaped like a FHIRPath date, date-time or time literal body.
fn scan_temporal(s: &str) -> &str {
    let b = s.as_bytes();
    let mut i = 0;
    let digits =
        |i: usize, n: usize| b.len() >= i + n && b[i..i + n].iter().all(u8::is_ascii_digit);
    let time = |mut i: usize| -> usize {
        if !digits(i, 2) {
            return i;
        }
        i += 2;
        if b.get(i) == Some(&b':') && digits(i + 1, 2) {
            i += 3;
            if b.get(i) == Some(&b':') && digits(i + 1, 2) {
                i += 3;
                if b.get(i) == Some(&b'.') && digits(i + 1, 1) {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
        }
        i
    };
    let tz = |i: usize| -> usize {
        match b.get(i) {
            Some(b'Z') => i + 1,
            Some(b'+') | Some(b'-')
                if digits(i + 1, 2) && b.get(i + 3) == Some(&b':') && digits(i + 4, 2) =>
            {
                i + 6
            }
            _ => i,
        }
    };
    if b.first() == Some(&b'T') {
        let j = time(1);
        return &s[..tz(j)];
    }
    if !digits(0, 4) {
        return "";
    }
    i += 4;
    if b.get(i) == Some(&b'-') && digits(i + 1, 2) {
        i += 3;
        if b.get(i) == Some(&b'-') && digits(i + 1, 2) {
            i += 3;
        }
    }
    if b.get(i) == Some(&b'T') {
        i = time(i + 1);
        i = tz(i);
    }
    &s[..i]
}

fn is_calendar_word(u: &str) -> bool {
    matches!(
        u,
        "year"
            | "years"
            | "month"
            | "months"
            | "week"
            | "weeks"
            | "day"
            | "days"
            | "hour"
            | "hours"
            | "minute"
            | "minutes"
            | "second"
            | "seconds"
            | "millisecond"
            | "milliseconds"
    )
}

impl BinOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::IntDiv => "div",
            BinOp::Mod => "mod",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Concat => "&",
            BinOp::Union => "|",
            BinOp::Lt => "<",
            BinOp::Gt => ">",
            BinOp::Le => "<=",
            BinOp::Ge => ">=",
            BinOp::Eq => "=",
            BinOp::Ne => "!=",
            BinOp::Equiv => "~",
            BinOp::NotEquiv => "!~",
            BinOp::In => "in",
            BinOp::Contains => "contains",
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::Xor => "xor",
            BinOp::Implies => "implies",
        }
    }
}

fn quote(s: &str, q: char) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

fn ident(name: &str) -> String {
    const KEYWORDS: &[&str] = &[
        "and", "or", "xor", "implies", "in", "contains", "div", "mod", "is", "as", "true", "false",
    ];
    let plain = name
        .chars()
        .next()
        .map(|c| c.is_alphabetic() || c == '_')
        .unwrap_or(false)
        && name.chars().all(|c| c.is_alphanumeric() || c == '_')
        && !KEYWORDS.contains(&name);
    if plain {
        name.to_string()
    } else {
        quote(name, '`')
    }
}

/// Prints an expression back as FHIRPath that parses to the same tree (fully parenthesised), so
/// expressions can be stored, logged by shape and round-trip tested.
impl std::fmt::Display for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expr::Literal(l) => match l {
                Literal::Empty => f.write_str("{}"),
                Literal::Bool(b) => write!(f, "{b}"),
                Literal::Str(s) => f.write_str(&quote(s, '\'')),
                Literal::Int(i) => write!(f, "{i}"),
                Literal::Long(i) => write!(f, "{i}L"),
                Literal::Dec(d) => {
                    let s = d.to_string();
                    if s.contains('.') {
                        f.write_str(&s)
                    } else {
                        write!(f, "{s}.0")
                    }
                }
                Literal::Date(d) | Literal::DateTime(d) => {
                    let s = d.to_fhir_string();
                    if matches!(l, Literal::DateTime(_)) && !s.contains('T') {
                        write!(f, "@{s}T")
                    } else {
                        write!(f, "@{s}")
                    }
                }
                Literal::Time(t) => write!(f, "@T{t}"),
                Literal::Quantity(v, u) => {
                    if is_calendar_word(u) {
                        write!(f, "{v} {u}")
                    } else {
                        write!(f, "{v} {}", quote(u, '\''))
                    }
                }
            },
            Expr::This => f.write_str("$this"),
            Expr::Index => f.write_str("$index"),
            Expr::Total => f.write_str("$total"),
            Expr::Var(v) => write!(f, "%{}", quote(v, '`')),
            Expr::Ident(n) => f.write_str(&ident(n)),
            Expr::Member(b, n) => write!(f, "({b}).{}", ident(n)),
            Expr::Call(recv, n, args) => {
                if let Some(r) = recv {
                    write!(f, "({r}).")?;
                }
                write!(f, "{}(", ident(n))?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
            Expr::Indexer(b, i) => write!(f, "({b})[{i}]"),
            Expr::Neg(e) => write!(f, "-({e})"),
            Expr::Binary(op, l, r) => write!(f, "({l}) {} ({r})", op.symbol()),
            Expr::Is(e, t) => write!(f, "({e}) is {}", type_name(t)),
            Expr::As(e, t) => write!(f, "({e}) as {}", type_name(t)),
        }
    }
}

fn type_name(t: &str) -> String {
    t.split('.').map(ident).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_and_invocation() {
        let e = parse("1 + 2 * 3").unwrap_or(Expr::This);
        assert!(matches!(e, Expr::Binary(BinOp::Add, _, _)));
        let e = parse("Patient.name.where(use = 'official').given.first()").unwrap_or(Expr::This);
        assert!(matches!(e, Expr::Call(Some(_), ref n, _) if n == "first"));
        assert!(parse("2 + 2 /").is_err());
        assert!(parse("2 + 2 /* x").is_err());
        assert!(matches!(
            parse("@2014.lowBoundary()"),
            Ok(Expr::Call(Some(_), _, _))
        ));
        assert!(matches!(
            parse("@2014-01-01T08:00:00.123.x()"),
            Ok(Expr::Call(Some(b), _, _)) if matches!(*b, Expr::Literal(Literal::DateTime(_)))
        ));
    }
}
