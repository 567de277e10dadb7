//! A FHIRPath engine (normative FHIRPath 2.0 plus FHIR's additions) over resources held as JSON.
//!
//! The validator evaluates every profile invariant with it, search extracts index values with it, and
//! SQL-on-FHIR views are written in it. Type information comes from the [`TypeModel`] built from the base
//! StructureDefinitions, so choice elements (`value[x]`), primitives with `_name` extensions and
//! contained resources navigate as the specification says.
//!
//! ```
//! use kizuna_fhir::fhirpath::{FhirPath, EvalContext};
//! use kizuna_fhir::Registry;
//! let reg = Registry::builtin();
//! let patient = serde_json::json!({"resourceType": "Patient", "name": [{"family": "山田", "given": ["太郎"]}]});
//! let expr = FhirPath::parse("Patient.name.given.first()").unwrap();
//! let ctx = EvalContext::new(reg.model()).with_resource(&patient);
//! let out = expr.evaluate_resource(&ctx, &patient).unwrap();
//! assert_eq!(out[0].to_display_string(reg.model()).as_deref(), Some("太郎"));
//! ```

mod boundary;
mod casts;
mod eval;
mod functions;
pub mod parse;
pub mod temporal;
pub mod ucum;

use std::collections::HashMap;

use crate::json::Member as _;

use rust_decimal::Decimal;
use serde_json::Value;

use crate::model::TypeModel;
pub use parse::{parse, Expr};
pub use temporal::{DateTime, Precision, Time};

/// Why an expression could not be parsed or evaluated; the kinds follow the FHIRPath test suite's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FhirPathError {
    /// The text is not a FHIRPath expression.
    #[error("FHIRPath 構文エラー / syntax error: {0}")]
    Syntax(String),
    /// The expression is well-formed but means nothing for these types (unknown element, wrong type).
    #[error("FHIRPath 意味エラー / semantic error: {0}")]
    Semantic(String),
    /// Evaluation failed (more than one item where one was required, bad operand types …).
    #[error("FHIRPath 実行エラー / execution error: {0}")]
    Execution(String),
}

/// A node of a FHIR resource: the JSON value, its `_name` sibling for primitives, and its FHIR type.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    /// The JSON value (absent for a primitive that has only extensions).
    pub value: Option<&'a Value>,
    /// The `_name` object of a primitive (id and extensions).
    pub ext: Option<&'a Value>,
    /// The type key: a FHIR type name or a backbone path.
    pub ty: &'a str,
}

/// One item of a FHIRPath collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// An element of the input.
    Node(Node<'a>),
    /// `System.Boolean`
    Bool(bool),
    /// `System.Integer`
    Int(i64),
    /// `System.Long` (`42L`)
    Long(i64),
    /// `System.Decimal`
    Dec(Decimal),
    /// `System.String`
    Str(String),
    /// `System.Date`
    Date(DateTime),
    /// `System.DateTime`
    DateTime(DateTime),
    /// `System.Time`
    Time(Time),
    /// `System.Quantity`: value and UCUM code or calendar word.
    Quantity(Decimal, String),
    /// The result of `type()`: namespace and name.
    TypeInfo(String, String),
}

impl<'a> Item<'a> {
    /// A node for a whole resource.
    pub fn resource(v: &'a Value) -> Item<'a> {
        Item::Node(Node {
            value: Some(v),
            ext: None,
            ty: v
                .member("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("Resource"),
        })
    }

    /// The value as text, for display and test comparison (`None` for complex nodes).
    pub fn to_display_string(&self, model: &TypeModel) -> Option<String> {
        match eval::to_system(self, model) {
            Some(Item::Str(s)) => Some(s),
            Some(Item::Bool(b)) => Some(b.to_string()),
            Some(Item::Int(i)) | Some(Item::Long(i)) => Some(i.to_string()),
            Some(Item::Dec(d)) => Some(d.to_string()),
            Some(Item::Date(d)) | Some(Item::DateTime(d)) => Some(d.to_fhir_string()),
            Some(Item::Time(t)) => Some(t.to_string()),
            Some(Item::Quantity(v, u)) => Some(format!("{v} '{u}'")),
            Some(Item::TypeInfo(ns, n)) => Some(format!("{ns}.{n}")),
            _ => None,
        }
    }
}

/// Looks codes up in value sets for `memberOf()`.
pub trait MemberOf {
    /// `Some(true/false)` when the value set is known, `None` when it is not.
    fn member_of(&self, value_set: &str, system: Option<&str>, code: &str) -> Option<bool>;
}

/// Checks a resource against a profile for `conformsTo()`.
pub trait ConformsTo {
    /// `Some(true/false)` when the profile is known, `None` when it is not.
    fn conforms_to(&self, resource: &Value, profile: &str) -> Option<bool>;
}

/// Everything an evaluation may look at besides its input: types, variables, the enclosing resources.
pub struct EvalContext<'a> {
    /// FHIR type information.
    pub model: &'a TypeModel,
    /// `%resource`: the resource containing the input.
    pub resource: Option<&'a Value>,
    /// `%rootResource`: the resource containing `%resource` when that one is contained, else `%resource`.
    pub root_resource: Option<&'a Value>,
    /// The Bundle around the resource, where `resolve()` looks for entries.
    pub bundle: Option<&'a Value>,
    /// `%name` variables set by the caller.
    pub vars: HashMap<String, Vec<Item<'a>>>,
    /// Terminology for `memberOf()`.
    pub terminology: Option<&'a dyn MemberOf>,
    /// Profile checker for `conformsTo()`.
    pub profiles: Option<&'a dyn ConformsTo>,
    /// Unknown root type names are errors instead of empty results.
    pub strict: bool,
    /// The instant `now()` returns; `None` reads the clock when asked (tests and replays fix it).
    pub now: Option<chrono::DateTime<chrono::FixedOffset>>,
}

impl<'a> EvalContext<'a> {
    /// A context with types only.
    pub fn new(model: &'a TypeModel) -> EvalContext<'a> {
        EvalContext {
            model,
            resource: None,
            root_resource: None,
            bundle: None,
            vars: HashMap::new(),
            terminology: None,
            profiles: None,
            strict: false,
            now: None,
        }
    }

    /// Sets `%resource` (and `%rootResource` if unset).
    pub fn with_resource(mut self, r: &'a Value) -> Self {
        self.resource = Some(r);
        if self.root_resource.is_none() {
            self.root_resource = Some(r);
        }
        self
    }

    /// Sets `%rootResource`.
    pub fn with_root(mut self, r: &'a Value) -> Self {
        self.root_resource = Some(r);
        self
    }

    /// Sets the Bundle `resolve()` searches.
    pub fn with_bundle(mut self, b: &'a Value) -> Self {
        self.bundle = Some(b);
        self
    }
}

/// Where a path expression starts: see [`FhirPath::root_elements`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootElement<'e> {
    /// The leading type name (`Observation` in `Observation.code`), when there is one. It
    /// selects the focus only when the focus is of that type; the caller checks it names a type.
    pub qualifier: Option<&'e str>,
    /// The element's name (`code`; `value` for `value[x]`).
    pub element: &'e str,
}

/// Functions whose result is empty whenever their input is: a path through them is empty when
/// its start is.
const EMPTY_IN_EMPTY_OUT: &[&str] = &[
    "where",
    "select",
    "repeat",
    "ofType",
    "as",
    "first",
    "last",
    "tail",
    "skip",
    "take",
    "single",
    "distinct",
    "extension",
    "resolve",
    "trace",
];

/// Collects the start elements of `e` into `out`; false when `e` is not a path whose result is
/// empty without them.
fn roots<'e>(e: &'e Expr, out: &mut Vec<RootElement<'e>>) -> bool {
    let leading_type = |n: &str| n.starts_with(|c: char| c.is_ascii_uppercase());
    match e {
        Expr::Ident(n) if !leading_type(n) => root(None, n, out),
        Expr::Member(inner, name) => match inner.as_ref() {
            Expr::Ident(t) if leading_type(t) => root(Some(t), name, out),
            other => roots(other, out),
        },
        // `Patient.extension('…')` and `extension('…')` read the focus's own `extension`.
        Expr::Call(recv, f, _) if f == "extension" => match recv.as_deref() {
            None => root(None, "extension", out),
            Some(Expr::Ident(t)) if leading_type(t) => root(Some(t), "extension", out),
            Some(x) => roots(x, out),
        },
        Expr::Call(Some(x), f, _) if EMPTY_IN_EMPTY_OUT.contains(&f.as_str()) => roots(x, out),
        Expr::As(x, _) | Expr::Indexer(x, _) => roots(x, out),
        Expr::Binary(parse::BinOp::Union, a, b) => roots(a, out) && roots(b, out),
        _ => false,
    }
}

fn root<'e>(qualifier: Option<&'e str>, element: &'e str, out: &mut Vec<RootElement<'e>>) -> bool {
    out.push(RootElement { qualifier, element });
    true
}

/// A parsed expression, ready to evaluate many times.
#[derive(Debug, Clone)]
pub struct FhirPath {
    expr: Expr,
    source: String,
}

impl FhirPath {
    /// Parses an expression.
    pub fn parse(src: &str) -> Result<FhirPath, FhirPathError> {
        Ok(FhirPath {
            expr: parse::parse(src)?,
            source: src.to_string(),
        })
    }

    /// The expression text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The syntax tree.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// The focus's own elements a path expression starts from (`Observation.code` starts from
    /// `code`; a union, from each part's), each with the type name that qualifies it, if any
    /// (`Observation`). When the focus has none of them the result is empty, so an index builder
    /// can skip the evaluation. `None` when the expression may give something without them:
    /// `exists()`, `count()`, literals, comparisons, variables.
    pub fn root_elements(&self) -> Option<Vec<RootElement<'_>>> {
        let mut out = Vec::new();
        roots(&self.expr, &mut out).then_some(out)
    }

    /// Evaluates against an input collection.
    pub fn evaluate<'a>(
        &self,
        ctx: &EvalContext<'a>,
        input: Vec<Item<'a>>,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        eval::Evaluator::new(ctx).run(&self.expr, input)
    }

    /// Evaluates with a resource as the input.
    pub fn evaluate_resource<'a>(
        &self,
        ctx: &EvalContext<'a>,
        resource: &'a Value,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        self.evaluate(ctx, vec![Item::resource(resource)])
    }

    /// Evaluates as a boolean invariant: `true`, `false`, or empty (`None`).
    pub fn evaluate_bool<'a>(
        &self,
        ctx: &EvalContext<'a>,
        input: Vec<Item<'a>>,
    ) -> Result<Option<bool>, FhirPathError> {
        let out = self.evaluate(ctx, input)?;
        match out.as_slice() {
            [] => Ok(None),
            [Item::Bool(b)] => Ok(Some(*b)),
            [Item::Node(n)] if n.ty == "boolean" => Ok(n.value.and_then(Value::as_bool)),
            [_] => Ok(Some(true)),
            _ => Err(FhirPathError::Execution(
                "真偽値が一つ必要です / expected a single boolean".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FhirPath, RootElement};

    fn roots(src: &str) -> Option<Vec<(Option<String>, String)>> {
        let p = FhirPath::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        p.root_elements().map(|v| {
            v.into_iter()
                .map(|RootElement { qualifier, element }| {
                    (qualifier.map(str::to_string), element.to_string())
                })
                .collect()
        })
    }

    fn q(t: &str, e: &str) -> (Option<String>, String) {
        (Some(t.to_string()), e.to_string())
    }

    #[test]
    fn paths_start_from_their_first_element() {
        assert_eq!(
            roots("Observation.code"),
            Some(vec![q("Observation", "code")])
        );
        assert_eq!(
            roots("Patient.name.family"),
            Some(vec![q("Patient", "name")])
        );
        assert_eq!(roots("name.given"), Some(vec![(None, "name".into())]));
        assert_eq!(
            roots("(Observation.value as Quantity) | (Observation.value as SampledData)"),
            Some(vec![q("Observation", "value"), q("Observation", "value")])
        );
        assert_eq!(
            roots("Observation.subject.where(reference.startsWith('Patient/')).first()"),
            Some(vec![q("Observation", "subject")])
        );
        assert_eq!(
            roots("Patient.extension('http://example.org/x').value.ofType(string)[0]"),
            Some(vec![q("Patient", "extension")])
        );
        assert_eq!(
            roots("Resource.meta.security | Condition.code"),
            Some(vec![q("Resource", "meta"), q("Condition", "code")])
        );
    }

    #[test]
    fn expressions_that_give_something_from_nothing_have_no_roots() {
        for src in [
            "Patient.deceased.exists() and Patient.deceased != false",
            "Observation.code.exists()",
            "Patient.name.count()",
            "Patient.name.empty()",
            "Patient.name.iif(true, 1, 2)",
            "Patient.active.not()",
            "Patient.name | 'x'",
            "%resource.name",
            "Patient",
            "Patient.name = 'x'",
            "Patient.name is HumanName",
            "$this.name",
            "iif(true, Patient.name, Patient.address)",
        ] {
            assert_eq!(roots(src), None, "{src}");
        }
    }
}
