//! Evaluation: navigation, operators, equality and ordering.

use std::cmp::Ordering;
use std::str::FromStr;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::Value;

use super::parse::{BinOp, Expr, Literal};
use super::temporal::{CalendarUnit, DateTime};
use super::{ucum, EvalContext, FhirPathError, Item, Node};
use crate::json::Member as _;
use crate::model::TypeModel;

pub(super) type Coll<'a> = Vec<Item<'a>>;
pub(super) type R<T> = Result<T, FhirPathError>;

/// Iteration variables in scope.
#[derive(Clone, Default)]
pub(super) struct Scope<'a> {
    pub this: Coll<'a>,
    pub index: Option<i64>,
    pub total: Option<Coll<'a>>,
}

pub(super) struct Evaluator<'c, 'a> {
    pub ctx: &'c EvalContext<'a>,
    pub context: Coll<'a>,
}

pub(super) fn exec(msg: impl Into<String>) -> FhirPathError {
    FhirPathError::Execution(msg.into())
}

impl<'c, 'a> Evaluator<'c, 'a> {
    pub fn new(ctx: &'c EvalContext<'a>) -> Self {
        Evaluator {
            ctx,
            context: Vec::new(),
        }
    }

    pub fn run(mut self, e: &Expr, input: Coll<'a>) -> R<Coll<'a>> {
        self.context = input.clone();
        let scope = Scope {
            this: input,
            ..Scope::default()
        };
        self.eval(e, &scope)
    }

    pub fn model(&self) -> &'a TypeModel {
        self.ctx.model
    }

    pub fn eval(&self, e: &Expr, s: &Scope<'a>) -> R<Coll<'a>> {
        match e {
            Expr::Literal(l) => Ok(literal(l)),
            Expr::This => Ok(s.this.clone()),
            Expr::Index => Ok(s.index.map(Item::Int).into_iter().collect()),
            Expr::Total => Ok(s.total.clone().unwrap_or_default()),
            Expr::Var(v) => self.var(v),
            Expr::Ident(name) => self.ident(name, &s.this),
            Expr::Member(base, name) => {
                let b = self.eval(base, s)?;
                self.navigate(&b, name)
            }
            Expr::Call(recv, name, args) => {
                let input = match recv {
                    Some(r) => self.eval(r, s)?,
                    None => s.this.clone(),
                };
                self.call(name, input, args, s)
            }
            Expr::Indexer(base, idx) => {
                let b = self.eval(base, s)?;
                let i = self.eval(idx, s)?;
                match single_int(&i, self.model())? {
                    Some(i) if i >= 0 => Ok(b.into_iter().nth(i as usize).into_iter().collect()),
                    _ => Ok(Vec::new()),
                }
            }
            Expr::Neg(inner) => {
                let v = self.eval(inner, s)?;
                match v.as_slice() {
                    [] => Ok(Vec::new()),
                    [x] => match to_system(x, self.model()) {
                        Some(Item::Int(i)) => Ok(vec![Item::Int(-i)]),
                        Some(Item::Long(i)) => Ok(vec![Item::Long(-i)]),
                        Some(Item::Dec(d)) if d.is_zero() => Ok(vec![Item::Dec(d)]),
                        Some(Item::Dec(d)) => Ok(vec![Item::Dec(-d)]),
                        Some(Item::Quantity(d, u)) => Ok(vec![Item::Quantity(-d, u)]),
                        _ => Err(exec("単項マイナスは数値のみ / unary minus needs a number")),
                    },
                    _ => Err(exec(
                        "単項マイナスは一つの値のみ / unary minus needs a single value",
                    )),
                }
            }
            Expr::Binary(op, l, r) => self.binary(*op, l, r, s),
            Expr::Is(inner, ty) => {
                let v = self.eval(inner, s)?;
                match v.as_slice() {
                    [] => Ok(Vec::new()),
                    [x] => Ok(vec![Item::Bool(self.is_type(x, ty))]),
                    _ => Err(exec("'is' は一つの値のみ / 'is' needs a single value")),
                }
            }
            Expr::As(inner, ty) => {
                let v = self.eval(inner, s)?;
                if v.len() > 1 {
                    return Err(exec("'as' は一つの値のみ / 'as' needs a single value"));
                }
                Ok(v.into_iter()
                    .filter(|x| self.type_matches(x, ty, true))
                    .collect())
            }
        }
    }

    fn var(&self, v: &str) -> R<Coll<'a>> {
        match v {
            "context" => Ok(self.context.clone()),
            "resource" => Ok(self.ctx.resource.map(Item::resource).into_iter().collect()),
            "rootResource" => Ok(self
                .ctx
                .root_resource
                .or(self.ctx.resource)
                .map(Item::resource)
                .into_iter()
                .collect()),
            "ucum" => Ok(vec![Item::Str("http://unitsofmeasure.org".into())]),
            "sct" => Ok(vec![Item::Str("http://snomed.info/sct".into())]),
            "loinc" => Ok(vec![Item::Str("http://loinc.org".into())]),
            _ => {
                if let Some(val) = self.ctx.vars.get(v) {
                    return Ok(val.clone());
                }
                if let Some(rest) = v.strip_prefix("vs-") {
                    return Ok(vec![Item::Str(format!(
                        "http://hl7.org/fhir/ValueSet/{rest}"
                    ))]);
                }
                if let Some(rest) = v.strip_prefix("ext-") {
                    return Ok(vec![Item::Str(format!(
                        "http://hl7.org/fhir/StructureDefinition/{rest}"
                    ))]);
                }
                Err(FhirPathError::Semantic(format!(
                    "未定義の変数 / undefined variable %{v}"
                )))
            }
        }
    }

    fn ident(&self, name: &str, focus: &Coll<'a>) -> R<Coll<'a>> {
        // A leading type name selects the focus items of that type (`Patient.name`).
        if name.starts_with(|c: char| c.is_ascii_uppercase()) {
            let matching: Coll<'a> = focus
                .iter()
                .filter(|i| match i {
                    Item::Node(n) => self.model().is_subtype(n.ty, name),
                    _ => false,
                })
                .cloned()
                .collect();
            if !matching.is_empty() {
                return Ok(matching);
            }
            if self.model().get(name).is_some() {
                let is_element = focus.iter().any(|i| match i {
                    Item::Node(n) => self.model().element(n.ty, name).is_some(),
                    _ => false,
                });
                if !is_element {
                    if self.ctx.strict {
                        return Err(FhirPathError::Semantic(format!(
                            "入力は {name} ではありません / the input is not a {name}"
                        )));
                    }
                    return Ok(Vec::new());
                }
            }
        }
        self.navigate(focus, name)
    }

    /// Navigates every item of a collection to its children called `name`. Naming an element that no
    /// item's type has is a semantic error; in a mixed collection the items without it just add nothing.
    pub fn navigate(&self, focus: &Coll<'a>, name: &str) -> R<Coll<'a>> {
        let mut out = Vec::new();
        let mut first_err = None;
        let mut known = false;
        for item in focus {
            match self.child(item, name, &mut out) {
                Ok(()) => known = true,
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) if !known => Err(e),
            _ => Ok(out),
        }
    }

    /// Navigates from one item to its children called `name`.
    pub fn child(&self, item: &Item<'a>, name: &str, out: &mut Coll<'a>) -> R<()> {
        let node = match item {
            Item::Node(n) => *n,
            Item::TypeInfo(ns, n) => {
                match name {
                    "namespace" => out.push(Item::Str(ns.clone())),
                    "name" => out.push(Item::Str(n.clone())),
                    _ => {}
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        let model = self.model();
        // One lookup of the node's type serves the primitive test and the element search.
        let info = model.get(node.ty).map(|t| t.as_ref());
        let is_prim = TypeModel::primitive(info, node.ty);
        let obj = if is_prim { node.ext } else { node.value };
        let Some(Value::Object(map)) = obj else {
            if is_prim && !matches!(name, "id" | "extension") {
                return Err(FhirPathError::Semantic(format!(
                    "{} に要素 {name} はありません / {} has no element {name}",
                    node.ty, node.ty
                )));
            }
            return Ok(());
        };
        if info.is_none() && !is_prim {
            // Unknown type: navigate the JSON as it is.
            if let Some(v) = crate::json::field(map, name) {
                push_dynamic(v, crate::json::underscored(map, name), out);
            }
            return Ok(());
        }
        let Some(el) = info.and_then(|t| model.element_in(t, name)) else {
            return Err(FhirPathError::Semantic(format!(
                "{} に要素 {name} はありません / {} has no element {name}",
                model.type_name(node.ty),
                model.type_name(node.ty)
            )));
        };
        if el.choice {
            // Look the object's keys up rather than building every possible `valueX` key.
            for (key, v) in map.iter() {
                let (bare, is_ext) = match key.strip_prefix('_') {
                    Some(b) => (b, true),
                    None => (key.as_str(), false),
                };
                if !bare.starts_with(name) {
                    continue;
                }
                let Some(i) = el.choice_keys.iter().position(|k| k == bare) else {
                    continue;
                };
                if is_ext {
                    if !crate::json::has_field(map, bare) {
                        push_values(model, None, Some(v), &el.types[i], out);
                    }
                } else {
                    let ext = crate::json::underscored(map, bare);
                    push_values(model, Some(v), ext, &el.types[i], out);
                }
            }
        } else {
            let t = el.types.first().map(String::as_str).unwrap_or("Element");
            let ext = if model.is_primitive(t) {
                crate::json::underscored(map, name)
            } else {
                None
            };
            push_values(model, crate::json::field(map, name), ext, t, out);
        }
        Ok(())
    }

    /// All child nodes of an item, in document order.
    pub fn children(&self, item: &Item<'a>, out: &mut Coll<'a>) {
        let Item::Node(node) = item else { return };
        let model = self.model();
        let obj = if model.is_primitive(node.ty) {
            node.ext
        } else {
            node.value
        };
        let Some(Value::Object(map)) = obj else {
            return;
        };
        let known = model.get(node.ty).is_some() || model.is_primitive(node.ty);
        for (k, v) in map {
            if k == "resourceType" {
                continue;
            }
            if let Some(base) = k.strip_prefix('_') {
                // Only extension-only primitives; the others are visited with their value.
                if crate::json::has_field(map, base) {
                    continue;
                }
                if let Some((_, t)) = model.element_for_json_key(node.ty, base) {
                    let t = intern_type(model, node.ty, base, &t);
                    push_values(model, None, Some(v), t, out);
                }
                continue;
            }
            if known {
                if let Some((_, t)) = model.element_for_json_key(node.ty, k) {
                    let t = intern_type(model, node.ty, k, &t);
                    let ext = if model.is_primitive(t) {
                        crate::json::underscored(map, k)
                    } else {
                        None
                    };
                    push_values(model, Some(v), ext, t, out);
                }
            } else {
                push_dynamic(v, crate::json::underscored(map, k), out);
            }
        }
    }

    fn binary(&self, op: BinOp, l: &Expr, r: &Expr, s: &Scope<'a>) -> R<Coll<'a>> {
        let model = self.model();
        match op {
            BinOp::And | BinOp::Or | BinOp::Xor | BinOp::Implies => {
                let a = to_bool3(&self.eval(l, s)?, model)?;
                // Short-circuit where the answer is already known.
                match (op, a) {
                    (BinOp::And, Some(false)) => return Ok(vec![Item::Bool(false)]),
                    (BinOp::Or, Some(true)) => return Ok(vec![Item::Bool(true)]),
                    (BinOp::Implies, Some(false)) => return Ok(vec![Item::Bool(true)]),
                    _ => {}
                }
                let b = to_bool3(&self.eval(r, s)?, model)?;
                let res = match op {
                    BinOp::And => match (a, b) {
                        (Some(true), Some(true)) => Some(true),
                        (_, Some(false)) | (Some(false), _) => Some(false),
                        _ => None,
                    },
                    BinOp::Or => match (a, b) {
                        (Some(true), _) | (_, Some(true)) => Some(true),
                        (Some(false), Some(false)) => Some(false),
                        _ => None,
                    },
                    BinOp::Xor => match (a, b) {
                        (Some(x), Some(y)) => Some(x != y),
                        _ => None,
                    },
                    _ => match (a, b) {
                        (Some(true), b) => b,
                        (None, Some(true)) => Some(true),
                        _ => None,
                    },
                };
                Ok(res.map(Item::Bool).into_iter().collect())
            }
            // `x = 'text'`, the commonest comparison in profile invariants: the literal is compared
            // where it lies instead of being copied into an item first.
            BinOp::Eq | BinOp::Ne if matches!(r, Expr::Literal(Literal::Str(_))) => {
                let a = self.eval(l, s)?;
                let eq = match (a.as_slice(), r) {
                    ([], _) => return Ok(Vec::new()),
                    ([x], Expr::Literal(Literal::Str(lit))) => match str_view(x, model) {
                        Some(v) => Some(v == lit.as_str()),
                        None => item_eq(x, &Item::Str(lit.clone()), model),
                    },
                    _ => Some(false),
                };
                let res = if op == BinOp::Eq { eq } else { eq.map(|x| !x) };
                Ok(res.map(Item::Bool).into_iter().collect())
            }
            BinOp::Union => {
                let mut a = self.eval(l, s)?;
                a.extend(self.eval(r, s)?);
                Ok(distinct(a, model))
            }
            _ => {
                let a = self.eval(l, s)?;
                let b = self.eval(r, s)?;
                apply_binary(op, a, b, model)
            }
        }
    }

    /// `is` for one item: the type name may be qualified (`FHIR.Patient`, `System.String`).
    pub fn is_type(&self, item: &Item<'a>, ty: &str) -> bool {
        self.type_matches(item, ty, false)
    }

    /// Type test; with `exact_primitive`, FHIR primitives match only their own type (`as`, `ofType`),
    /// otherwise their base types too (`is`: a `code` is a `string`).
    pub fn type_matches(&self, item: &Item<'a>, ty: &str, exact_primitive: bool) -> bool {
        let model = self.model();
        let (ns, name) = match ty.split_once('.') {
            Some((ns @ ("FHIR" | "System"), n)) => (Some(ns), n),
            _ => (None, ty),
        };
        match item {
            Item::Node(n) => {
                if ns == Some("System") {
                    return false;
                }
                let actual = model.type_name(n.ty);
                if exact_primitive && model.is_primitive(actual) {
                    return actual == name;
                }
                model.is_subtype(actual, name)
            }
            other => {
                if ns == Some("FHIR") {
                    return false;
                }
                system_type_name(other) == Some(name)
            }
        }
    }
}

fn intern_type<'a>(model: &'a TypeModel, owner: &str, key: &str, chosen: &str) -> &'a str {
    // Return the type string owned by the model so the node can borrow it for 'a.
    if let Some((el, _)) = model.element_for_json_key(owner, key) {
        if let Some(t) = el.types.iter().find(|t| t.as_str() == chosen) {
            return t.as_str();
        }
    }
    "Element"
}

fn push_values<'a>(
    model: &TypeModel,
    v: Option<&'a Value>,
    ext: Option<&'a Value>,
    ty: &'a str,
    out: &mut Coll<'a>,
) {
    // Asked once per call, not per value of an array.
    let is_resource =
        v.is_some() && (ty == "Resource" || ty == "DomainResource" || model.is_resource(ty));
    let resource_ty = |x: &'a Value| -> &'a str {
        if is_resource {
            x.member("resourceType")
                .and_then(Value::as_str)
                .unwrap_or(ty)
        } else {
            ty
        }
    };
    match (v, ext) {
        (Some(Value::Array(vs)), ext) => {
            let exts = ext.and_then(Value::as_array);
            for (i, x) in vs.iter().enumerate() {
                let e = exts.and_then(|a| a.get(i)).filter(|e| !e.is_null());
                if x.is_null() && e.is_none() {
                    continue;
                }
                out.push(Item::Node(Node {
                    value: if x.is_null() { None } else { Some(x) },
                    ext: e,
                    ty: resource_ty(x),
                }));
            }
        }
        (None, Some(Value::Array(es))) => {
            for e in es.iter().filter(|e| !e.is_null()) {
                out.push(Item::Node(Node {
                    value: None,
                    ext: Some(e),
                    ty,
                }));
            }
        }
        (Some(x), ext) => out.push(Item::Node(Node {
            value: Some(x),
            ext,
            ty: resource_ty(x),
        })),
        (None, Some(e)) => out.push(Item::Node(Node {
            value: None,
            ext: Some(e),
            ty,
        })),
        (None, None) => {}
    }
}

fn push_dynamic<'a>(v: &'a Value, ext: Option<&'a Value>, out: &mut Coll<'a>) {
    let ty_of = |x: &'a Value| -> &'a str {
        match x {
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "decimal",
            Value::String(_) => "string",
            Value::Object(o) => o
                .member("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("Element"),
            _ => "Element",
        }
    };
    match v {
        Value::Array(a) => {
            for x in a {
                out.push(Item::Node(Node {
                    value: Some(x),
                    ext: None,
                    ty: ty_of(x),
                }))
            }
        }
        x => out.push(Item::Node(Node {
            value: Some(x),
            ext,
            ty: ty_of(x),
        })),
    }
}

pub(super) fn literal<'a>(l: &Literal) -> Coll<'a> {
    vec![match l {
        Literal::Empty => return Vec::new(),
        Literal::Bool(b) => Item::Bool(*b),
        Literal::Str(s) => Item::Str(s.clone()),
        Literal::Int(i) => Item::Int(*i),
        Literal::Long(i) => Item::Long(*i),
        Literal::Dec(d) => Item::Dec(*d),
        Literal::Date(d) => Item::Date(d.clone()),
        Literal::DateTime(d) => Item::DateTime(d.clone()),
        Literal::Time(t) => Item::Time(t.clone()),
        Literal::Quantity(v, u) => Item::Quantity(*v, u.clone()),
    }]
}

pub(super) fn system_type_name(i: &Item<'_>) -> Option<&'static str> {
    Some(match i {
        Item::Bool(_) => "Boolean",
        Item::Int(_) => "Integer",
        Item::Long(_) => "Long",
        Item::Dec(_) => "Decimal",
        Item::Str(_) => "String",
        Item::Date(_) => "Date",
        Item::DateTime(_) => "DateTime",
        Item::Time(_) => "Time",
        Item::Quantity(..) => "Quantity",
        Item::TypeInfo(..) | Item::Node(_) => return None,
    })
}

fn json_decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => {
            let s = n.to_string();
            Decimal::from_str(&s)
                .or_else(|_| Decimal::from_scientific(&s))
                .ok()
        }
        Value::String(s) => Decimal::from_str(s).ok(),
        _ => None,
    }
}

/// The FHIRPath system value of an item: primitives become System types, Quantity-like nodes become
/// quantities; complex nodes stay nodes. `None` for a primitive without a value.
pub fn to_system<'a>(i: &Item<'a>, model: &TypeModel) -> Option<Item<'a>> {
    let Item::Node(n) = i else {
        return Some(i.clone());
    };
    let ty = model.type_name(n.ty);
    if model.is_primitive(ty) {
        let v = n.value?;
        return Some(match ty {
            "boolean" => Item::Bool(v.as_bool()?),
            "integer" | "positiveInt" | "unsignedInt" => Item::Int(v.as_i64()?),
            "integer64" => Item::Long(v.as_i64()?),
            "decimal" => Item::Dec(json_decimal(v)?),
            "date" => Item::Date(DateTime::parse(v.as_str()?, false)?),
            "dateTime" | "instant" => Item::DateTime(DateTime::parse(v.as_str()?, false)?),
            "time" => Item::Time(super::Time::parse(v.as_str()?, false)?),
            _ => match v {
                Value::String(s) => Item::Str(s.clone()),
                Value::Bool(b) => Item::Bool(*b),
                Value::Number(_) => Item::Dec(json_decimal(v)?),
                _ => return None,
            },
        });
    }
    if model.is_subtype(ty, "Quantity") {
        let v = n.value?;
        let value = json_decimal(v.member("value")?)?;
        let unit = v
            .member("code")
            .or_else(|| v.member("unit"))
            .and_then(Value::as_str)
            .unwrap_or("1")
            .to_string();
        return Some(Item::Quantity(value, unit));
    }
    Some(i.clone())
}

pub(super) fn single<'x, 'a>(c: &'x Coll<'a>, what: &str) -> R<Option<&'x Item<'a>>> {
    match c.as_slice() {
        [] => Ok(None),
        [x] => Ok(Some(x)),
        _ => Err(exec(format!(
            "{what}: 一つの値が必要です / expected a single item"
        ))),
    }
}

pub(super) fn single_int(c: &Coll<'_>, model: &TypeModel) -> R<Option<i64>> {
    match single(c, "integer")? {
        None => Ok(None),
        Some(x) => match to_system(x, model) {
            Some(Item::Int(i)) | Some(Item::Long(i)) => Ok(Some(i)),
            _ => Err(exec("整数が必要です / expected an integer")),
        },
    }
}

pub(super) fn single_str(c: &Coll<'_>, model: &TypeModel) -> R<Option<String>> {
    match single(c, "string")? {
        None => Ok(None),
        Some(x) => match to_system(x, model) {
            Some(Item::Str(s)) => Ok(Some(s)),
            _ => Err(FhirPathError::Semantic(
                "文字列が必要です / expected a string".into(),
            )),
        },
    }
}

/// Singleton evaluation of collections as a boolean (three-valued).
pub(super) fn to_bool3(c: &Coll<'_>, model: &TypeModel) -> R<Option<bool>> {
    match c.as_slice() {
        [] => Ok(None),
        [x] => match to_system(x, model) {
            Some(Item::Bool(b)) => Ok(Some(b)),
            None => Ok(None),
            // Singleton evaluation: one item that is not a Boolean counts as true.
            Some(_) => Ok(Some(true)),
        },
        _ => Err(exec("真偽値が一つ必要です / expected a single boolean")),
    }
}

fn normalize_ws(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn dec_of(i: &Item<'_>) -> Option<Decimal> {
    match i {
        Item::Int(x) | Item::Long(x) => Some(Decimal::from(*x)),
        Item::Dec(d) => Some(*d),
        _ => None,
    }
}

fn as_datetime(i: &Item<'_>) -> Option<DateTime> {
    match i {
        Item::Date(d) | Item::DateTime(d) => Some(d.clone()),
        _ => None,
    }
}

/// Quantities compare after converting the right to the left's unit; calendar words for definite
/// durations (week … millisecond) equal their UCUM codes.
fn quantity_cmp(av: Decimal, au: &str, bv: Decimal, bu: &str) -> Option<Ordering> {
    let canon = |u: &str| -> String {
        match u {
            "week" | "weeks" => "wk",
            "day" | "days" => "d",
            "hour" | "hours" => "h",
            "minute" | "minutes" => "min",
            "second" | "seconds" => "s",
            "millisecond" | "milliseconds" => "ms",
            "year" | "years" => "year",
            "month" | "months" => "month",
            other => other,
        }
        .to_string()
    };
    let (au, bu) = (canon(au), canon(bu));
    if au == bu {
        return av.partial_cmp(&bv);
    }
    let b2 = ucum::convert(bv, &bu, &au)?;
    av.partial_cmp(&b2)
}

/// The text of an item whose system value is a `System.String` (a string literal, or a FHIR
/// primitive `to_system` turns into one), borrowed: comparing profile URLs and codes this way
/// allocates nothing, where `to_system` copies both sides.
fn str_view<'x>(i: &'x Item<'_>, model: &TypeModel) -> Option<&'x str> {
    match i {
        Item::Str(s) => Some(s),
        Item::Node(n) => {
            let Some(Value::String(s)) = n.value else {
                return None;
            };
            let ty = model.type_name(n.ty);
            let other_system_type = matches!(
                ty,
                "boolean"
                    | "integer"
                    | "positiveInt"
                    | "unsignedInt"
                    | "integer64"
                    | "decimal"
                    | "date"
                    | "dateTime"
                    | "instant"
                    | "time"
            );
            (!other_system_type && model.is_primitive(ty)).then_some(s.as_str())
        }
        _ => None,
    }
}

/// Equality of two items: `None` when unknown (partial dates).
pub fn item_eq(a: &Item<'_>, b: &Item<'_>, model: &TypeModel) -> Option<bool> {
    if let (Some(x), Some(y)) = (str_view(a, model), str_view(b, model)) {
        return Some(x == y);
    }
    let (Some(a), Some(b)) = (to_system(a, model), to_system(b, model)) else {
        return None;
    };
    match (&a, &b) {
        (Item::Node(x), Item::Node(y)) => Some(json_eq(x.value, y.value) && json_eq(x.ext, y.ext)),
        (Item::Str(x), Item::Str(y)) => Some(x == y),
        (Item::Bool(x), Item::Bool(y)) => Some(x == y),
        (Item::Date(_) | Item::DateTime(_), Item::Date(_) | Item::DateTime(_)) => {
            let (x, y) = (as_datetime(&a)?, as_datetime(&b)?);
            x.compare(&y).map(|o| o == Ordering::Equal)
        }
        (Item::Time(x), Item::Time(y)) => x.compare(y).map(|o| o == Ordering::Equal),
        (Item::Quantity(av, au), Item::Quantity(bv, bu)) => match quantity_cmp(*av, au, *bv, bu) {
            Some(o) => Some(o == Ordering::Equal),
            // A calendar year or month against UCUM `a` / `mo` is not definite: unknown.
            None if is_calendar_vs_ucum(au, bu) => None,
            None => Some(false),
        },
        (Item::TypeInfo(a1, a2), Item::TypeInfo(b1, b2)) => Some(a1 == b1 && a2 == b2),
        _ => match (dec_of(&a), dec_of(&b)) {
            (Some(x), Some(y)) => Some(x == y),
            _ => Some(false),
        },
    }
}

fn is_calendar_vs_ucum(a: &str, b: &str) -> bool {
    let cal = |u: &str| matches!(u, "year" | "years" | "month" | "months");
    let uc = |u: &str| matches!(u, "a" | "mo");
    (cal(a) && uc(b)) || (uc(a) && cal(b))
}

fn json_eq(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn round_to(d: Decimal, scale: u32) -> Decimal {
    d.round_dp_with_strategy(scale, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
}

/// Equivalence (`~`) of two items.
pub fn item_equiv(a: &Item<'_>, b: &Item<'_>, model: &TypeModel) -> bool {
    let (Some(a), Some(b)) = (to_system(a, model), to_system(b, model)) else {
        return false;
    };
    match (&a, &b) {
        (Item::Str(x), Item::Str(y)) => normalize_ws(x) == normalize_ws(y),
        (Item::Date(_) | Item::DateTime(_), Item::Date(_) | Item::DateTime(_)) => {
            match (as_datetime(&a), as_datetime(&b)) {
                (Some(x), Some(y)) => x.compare(&y) == Some(Ordering::Equal),
                _ => false,
            }
        }
        (Item::Time(x), Item::Time(y)) => x.compare(y) == Some(Ordering::Equal),
        (Item::Quantity(av, au), Item::Quantity(bv, bu)) => {
            let b = ucum::convert(*bv, bu, au);
            match b {
                Some(b) => {
                    let scale = av.scale().min(b.normalize().scale());
                    round_to(*av, scale) == round_to(b, scale)
                }
                None => quantity_cmp(*av, au, *bv, bu) == Some(Ordering::Equal),
            }
        }
        (Item::Node(_), Item::Node(_)) => item_eq(&a, &b, model).unwrap_or(false),
        _ => match (dec_of(&a), dec_of(&b)) {
            (Some(x), Some(y)) => {
                let scale = x.scale().min(y.scale());
                round_to(x, scale) == round_to(y, scale)
            }
            _ => item_eq(&a, &b, model).unwrap_or(false),
        },
    }
}

/// Ordering of two items for `<` and friends: an error when the types cannot be compared, `None` when
/// the answer is unknown.
pub fn item_cmp(a: &Item<'_>, b: &Item<'_>, model: &TypeModel) -> R<Option<Ordering>> {
    let (Some(a), Some(b)) = (to_system(a, model), to_system(b, model)) else {
        return Ok(None);
    };
    let incomparable = || exec("比較できない型です / these types cannot be compared");
    Ok(match (&a, &b) {
        (Item::Str(x), Item::Str(y)) => Some(x.cmp(y)),
        (Item::Date(_) | Item::DateTime(_), Item::Date(_) | Item::DateTime(_)) => as_datetime(&a)
            .zip(as_datetime(&b))
            .and_then(|(x, y)| x.compare(&y)),
        (Item::Time(x), Item::Time(y)) => x.compare(y),
        (Item::Quantity(av, au), Item::Quantity(bv, bu)) => {
            Some(quantity_cmp(*av, au, *bv, bu).ok_or_else(incomparable)?)
        }
        _ => match (dec_of(&a), dec_of(&b)) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => return Err(incomparable()),
        },
    })
}

pub(super) fn distinct<'a>(items: Coll<'a>, model: &TypeModel) -> Coll<'a> {
    let mut out: Coll<'a> = Vec::with_capacity(items.len());
    for i in items {
        if !out.iter().any(|o| item_eq(o, &i, model) == Some(true)) {
            out.push(i);
        }
    }
    out
}

pub(super) fn contains_item(c: &Coll<'_>, x: &Item<'_>, model: &TypeModel) -> bool {
    c.iter().any(|o| item_eq(o, x, model) == Some(true))
}

fn arith_int(op: BinOp, x: i64, y: i64) -> Option<Item<'static>> {
    let r = match op {
        BinOp::Add => x.checked_add(y),
        BinOp::Sub => x.checked_sub(y),
        BinOp::Mul => x.checked_mul(y),
        BinOp::IntDiv => {
            if y == 0 {
                return None;
            }
            // FHIRPath `div` truncates toward zero, as Rust's `/` does.
            x.checked_div(y)
        }
        BinOp::Mod => {
            if y == 0 {
                return None;
            }
            x.checked_rem(y)
        }
        _ => return None,
    }?;
    // FHIRPath Integer is 32-bit.
    if r > i32::MAX as i64 || r < i32::MIN as i64 {
        return None;
    }
    Some(Item::Int(r))
}

fn apply_binary<'a>(op: BinOp, a: Coll<'a>, b: Coll<'a>, model: &TypeModel) -> R<Coll<'a>> {
    let one = |v: Option<bool>| -> Coll<'a> { v.map(Item::Bool).into_iter().collect() };
    match op {
        BinOp::Eq | BinOp::Ne => {
            if a.is_empty() || b.is_empty() {
                return Ok(Vec::new());
            }
            let eq = if a.len() != b.len() {
                Some(false)
            } else {
                let mut res = Some(true);
                for (x, y) in a.iter().zip(&b) {
                    match item_eq(x, y, model) {
                        Some(true) => {}
                        Some(false) => {
                            res = Some(false);
                            break;
                        }
                        None => res = None,
                    }
                }
                res
            };
            Ok(one(if op == BinOp::Eq { eq } else { eq.map(|x| !x) }))
        }
        BinOp::Equiv | BinOp::NotEquiv => {
            let eq = if a.len() != b.len() {
                false
            } else {
                let mut used = vec![false; b.len()];
                a.iter().all(|x| {
                    for (j, y) in b.iter().enumerate() {
                        if !used[j] && item_equiv(x, y, model) {
                            used[j] = true;
                            return true;
                        }
                    }
                    false
                })
            };
            Ok(vec![Item::Bool(if op == BinOp::Equiv { eq } else { !eq })])
        }
        BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
            let (Some(x), Some(y)) = (single(&a, "comparison")?, single(&b, "comparison")?) else {
                return Ok(Vec::new());
            };
            let o = item_cmp(x, y, model)?;
            Ok(one(o.map(|o| match op {
                BinOp::Lt => o == Ordering::Less,
                BinOp::Gt => o == Ordering::Greater,
                BinOp::Le => o != Ordering::Greater,
                _ => o != Ordering::Less,
            })))
        }
        BinOp::In | BinOp::Contains => {
            let (item, coll) = if op == BinOp::In { (&a, &b) } else { (&b, &a) };
            match single(item, "membership")? {
                None => Ok(Vec::new()),
                Some(x) => Ok(vec![Item::Bool(contains_item(coll, x, model))]),
            }
        }
        BinOp::Concat => {
            let s = |c: &Coll<'a>| -> R<String> {
                match single(c, "&")? {
                    None => Ok(String::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Str(s)) => Ok(s),
                        None => Ok(String::new()),
                        _ => Err(exec("& は文字列のみ / & needs strings")),
                    },
                }
            };
            Ok(vec![Item::Str(s(&a)? + &s(&b)?)])
        }
        _ => {
            let (Some(x), Some(y)) = (single(&a, "arithmetic")?, single(&b, "arithmetic")?) else {
                return Ok(Vec::new());
            };
            let (Some(x), Some(y)) = (to_system(x, model), to_system(y, model)) else {
                return Ok(Vec::new());
            };
            arith(op, &x, &y)
        }
    }
}

fn arith<'a>(op: BinOp, x: &Item<'a>, y: &Item<'a>) -> R<Coll<'a>> {
    let bad = || exec("演算できない型です / operator not defined for these types");
    let res: Option<Item<'a>> = match (x, y) {
        (Item::Int(a), Item::Int(b)) if op != BinOp::Div => arith_int(op, *a, *b),
        (Item::Long(a) | Item::Int(a), Item::Long(b) | Item::Int(b)) if op != BinOp::Div => {
            arith_int(op, *a, *b).map(|i| match i {
                Item::Int(v) => Item::Long(v),
                o => o,
            })
        }
        (Item::Str(a), Item::Str(b)) if op == BinOp::Add => Some(Item::Str(format!("{a}{b}"))),
        (Item::Date(d), Item::Quantity(v, u)) | (Item::DateTime(d), Item::Quantity(v, u))
            if matches!(op, BinOp::Add | BinOp::Sub) =>
        {
            let unit = CalendarUnit::from_unit(u, true).ok_or_else(bad)?;
            if !v.fract().is_zero() && matches!(unit, CalendarUnit::Year | CalendarUnit::Month) {
                return Err(bad());
            }
            let mut n = v.trunc().to_i64().ok_or_else(bad)?;
            if op == BinOp::Sub {
                n = -n;
            }
            if matches!(x, Item::Date(_))
                && matches!(
                    unit,
                    CalendarUnit::Hour
                        | CalendarUnit::Minute
                        | CalendarUnit::Second
                        | CalendarUnit::Millisecond
                )
            {
                return Err(bad());
            }
            let r = d.add(n, unit);
            r.map(|r| {
                if matches!(x, Item::Date(_)) {
                    Item::Date(r)
                } else {
                    Item::DateTime(r)
                }
            })
        }
        (Item::Time(t), Item::Quantity(v, u)) if matches!(op, BinOp::Add | BinOp::Sub) => {
            let unit = CalendarUnit::from_unit(u, true).ok_or_else(bad)?;
            let mut n = v.trunc().to_i64().ok_or_else(bad)?;
            if op == BinOp::Sub {
                n = -n;
            }
            t.add(n, unit).map(Item::Time)
        }
        (Item::Quantity(av, au), Item::Quantity(bv, bu)) => match op {
            BinOp::Add | BinOp::Sub => {
                let b = ucum::convert(*bv, bu, au);
                match b {
                    Some(b) => {
                        let r = if op == BinOp::Add {
                            av.checked_add(b)
                        } else {
                            av.checked_sub(b)
                        };
                        r.map(|r| Item::Quantity(r, au.clone()))
                    }
                    None => None,
                }
            }
            BinOp::Mul => av
                .checked_mul(*bv)
                .map(|r| Item::Quantity(r, unit_product(au, bu, '.'))),
            BinOp::Div => {
                if bv.is_zero() {
                    None
                } else {
                    av.checked_div(*bv)
                        .map(|r| Item::Quantity(r.normalize(), unit_product(au, bu, '/')))
                }
            }
            _ => return Err(bad()),
        },
        (Item::Quantity(av, au), b) if matches!(op, BinOp::Mul | BinOp::Div) => {
            let bd = dec_of(b).ok_or_else(bad)?;
            if op == BinOp::Mul {
                av.checked_mul(bd).map(|r| Item::Quantity(r, au.clone()))
            } else if bd.is_zero() {
                None
            } else {
                av.checked_div(bd).map(|r| Item::Quantity(r, au.clone()))
            }
        }
        (a, Item::Quantity(bv, bu)) if op == BinOp::Mul => {
            let ad = dec_of(a).ok_or_else(bad)?;
            ad.checked_mul(*bv).map(|r| Item::Quantity(r, bu.clone()))
        }
        _ => {
            let (a, b) = (dec_of(x).ok_or_else(bad)?, dec_of(y).ok_or_else(bad)?);
            match op {
                BinOp::Add => a.checked_add(b).map(Item::Dec),
                BinOp::Sub => a.checked_sub(b).map(Item::Dec),
                BinOp::Mul => a.checked_mul(b).map(Item::Dec),
                BinOp::Div => {
                    if b.is_zero() {
                        None
                    } else {
                        a.checked_div(b).map(|d| Item::Dec(d.normalize()))
                    }
                }
                BinOp::IntDiv => {
                    if b.is_zero() {
                        None
                    } else {
                        a.checked_div(b)
                            .and_then(|d| d.trunc().to_i64())
                            .map(Item::Int)
                    }
                }
                BinOp::Mod => {
                    if b.is_zero() {
                        None
                    } else {
                        a.checked_rem(b).map(Item::Dec)
                    }
                }
                _ => return Err(bad()),
            }
        }
    };
    Ok(res.into_iter().collect())
}

fn unit_product(a: &str, b: &str, op: char) -> String {
    match (a, b, op) {
        (a, "1", _) => a.to_string(),
        ("1", b, '.') => b.to_string(),
        (a, b, '/') if a == b => "1".to_string(),
        (a, b, _) => format!("{a}{op}{b}"),
    }
}
