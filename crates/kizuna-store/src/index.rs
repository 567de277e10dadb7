//! Search index values, extracted from resources by the SearchParameter definitions' FHIRPath.
//!
//! Every SearchParameter of the loaded packages whose `base` names a resource type is compiled once; on
//! write, its expression is evaluated on the resource and each value is reduced to rows of one of the
//! index tables (token, string, date range, reference, number, uri).

use std::collections::HashMap;
use std::sync::Arc;

use kizuna_fhir::fhirpath::{DateTime, EvalContext, FhirPath, Item, Precision};
use kizuna_fhir::json::Member as _;
use kizuna_fhir::model::TypeModel;
use kizuna_fhir::Registry;
use serde_json::Value;

/// The kinds of search parameter the index stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    /// token
    Token,
    /// string
    String,
    /// date
    Date,
    /// reference
    Reference,
    /// number
    Number,
    /// quantity (value with system, code and unit)
    Quantity,
    /// uri
    Uri,
    /// composite: a tuple of other parameters' values taken from one element
    Composite,
}

impl ParamType {
    /// The FHIR name of the type (`token`, `string` …).
    pub fn name(self) -> &'static str {
        match self {
            ParamType::Token => "token",
            ParamType::String => "string",
            ParamType::Date => "date",
            ParamType::Reference => "reference",
            ParamType::Number => "number",
            ParamType::Quantity => "quantity",
            ParamType::Uri => "uri",
            ParamType::Composite => "composite",
        }
    }

    fn from_fhir(t: &str) -> Option<ParamType> {
        Some(match t {
            "token" => ParamType::Token,
            "string" => ParamType::String,
            "date" => ParamType::Date,
            "reference" => ParamType::Reference,
            "number" => ParamType::Number,
            "quantity" => ParamType::Quantity,
            "uri" => ParamType::Uri,
            "composite" => ParamType::Composite,
            _ => return None,
        })
    }
}

/// One part of a composite parameter: its type and its expression, evaluated on each element the
/// composite's own expression selects.
#[derive(Debug, Clone)]
pub struct Component {
    /// The component's type.
    pub kind: ParamType,
    /// The expression relative to the composite's element.
    pub expr: Arc<FhirPath>,
}

/// A compiled search parameter.
#[derive(Debug, Clone)]
pub struct SearchParam {
    /// The code used in queries (`code`, `patient`, `birthdate`).
    pub code: String,
    /// Its type.
    pub kind: ParamType,
    /// The expression.
    pub expr: Arc<FhirPath>,
    /// For reference parameters: the resource types a reference may point to (chains try each).
    pub targets: Vec<String>,
    /// For composite parameters: the components, in order.
    pub components: Vec<Component>,
    /// When the parameter's expression is the union of other parameters' expressions on this type
    /// (`combo-code` = `code` | `component-code`), their codes: it is not indexed itself, and a
    /// search on it reads their rows.
    pub union_of: Vec<String>,
    /// For a composite over the resource itself (`code-value-quantity` is defined on
    /// `Observation`): where each component's values are, in component order. The resource is
    /// the composite's one element, so a tuple matches exactly when every component matches some
    /// value of the resource: the composite is searched as the conjunction of its components and
    /// has no tuple rows (they were the widest rows, written at random places of their B-tree:
    /// a fifth of the pages an ingest wrote). Empty for every other parameter.
    pub conjunction: Vec<Conjunct>,
    /// For a conjunctive composite of a code and a quantity with one value per resource
    /// (`code-value-quantity`): it also has rows of its own, one per code of the resource with
    /// the value beside it ([`IndexValue::CodeValue`]), keyed by code and then row id. `{code}$gt5` reads one range
    /// of them instead of probing every resource with the code for a value (20–40 ms for a code
    /// with 20,000–66,000 resources and few or no matches at 1M), and a new row goes to the end
    /// of its code's range, not to a random page (as a tuple keyed by value did).
    pub code_value_rows: bool,
    /// For a string parameter over a HumanName or Address (`name`, `address`): the parts another
    /// parameter of the type indexes alone (`family`, `given`, `address-city` …), by JSON key.
    /// Their values are read from that parameter's rows, not written a second time under this
    /// one: a Patient's `family`, `given` and four address parts were 8 of its 17 string rows.
    pub part_params: Vec<PartParam>,
    /// The parameters of the type defined as this one narrowed by a `where` (`patient` is
    /// `Observation.subject.where(resolve() is Patient)`, `phone` is
    /// `Patient.telecom.where(system='phone')`): their rows are a subset of this one's, so they
    /// are written once, under the narrower code, and a search on this one reads them too
    /// (`patient` was 5 % of a JP-CLINS ingest's rows, each repeating a `subject` row).
    pub narrowings: Vec<String>,
    /// For a reference parameter whose values are whole resources inside this one rather than
    /// references (R4's `Bundle.composition` and `Bundle.message`: `Bundle.entry[0].resource`):
    /// the embedded resource's own parameters are indexed on this resource under
    /// `{code}.{parameter}` ([`Indexer::param`] knows them), so `Bundle?composition.type=…` and
    /// chains onward (`composition.subject.name=…`) are plain lookups. Its own rows name the
    /// embedded resources by type and id.
    pub embeds: bool,
    /// The top-level `|` parts of the expression that apply to this type (for union detection).
    parts: Vec<String>,
    /// The resource elements the expression starts from, when it is a plain path: a resource
    /// with none of them has no rows for this parameter, and is not evaluated. Most parameters
    /// of a type find nothing in a given resource (56 % of evaluations on the JP-CLINS data).
    starts: Option<Vec<StartKey>>,
}

/// A part of a HumanName or Address with a parameter of its own ([`SearchParam::part_params`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartParam {
    /// The part's JSON key (`family`, `postalCode`).
    pub key: String,
    /// The parameter indexing it alone (`family`, `address-postalcode`).
    pub code: String,
}

/// Where one component of a conjunctive composite ([`SearchParam::conjunction`]) keeps its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conjunct {
    /// The code whose rows hold them: another parameter of the type defined by the same path
    /// (`code`, `value-concept`), or `{composite}#{i}`.
    pub code: String,
    /// True for `{composite}#{i}`: the component's values are indexed under that code. `#` is
    /// not valid in a SearchParameter code, so no real parameter has it.
    pub own_rows: bool,
}

/// A top-level element a parameter's expression starts from, by the JSON keys that hold it.
#[derive(Debug, Clone)]
struct StartKey {
    /// The element's name, also its JSON key unless it is a choice.
    name: String,
    /// `_name`, for elements that may be primitives (whose extensions live there).
    underscored: Option<String>,
    /// `value[x]`: held under `valueQuantity`, `valueString` …
    choice: bool,
}

impl StartKey {
    /// The start keys of `expr` on resources of `base`; `None` when some start cannot be
    /// checked from the JSON keys alone (the expression is then always evaluated).
    fn of(expr: &FhirPath, base: &str, model: &TypeModel) -> Option<Vec<StartKey>> {
        let mut roots = expr.root_elements()?;
        // A leading name that is no type navigates a child of that name instead.
        if roots
            .iter()
            .any(|r| r.qualifier.is_some_and(|t| model.get(t).is_none()))
        {
            return None;
        }
        roots.sort_by_key(|r| r.element);
        roots.dedup_by_key(|r| r.element);
        roots
            .iter()
            .map(|r| {
                let e = model.element(base, r.element)?;
                let primitive = e.types.iter().any(|t| model.is_primitive(t));
                Some(StartKey {
                    name: r.element.to_string(),
                    underscored: primitive.then(|| format!("_{}", r.element)),
                    choice: e.choice,
                })
            })
            .collect()
    }

    /// True when a resource's JSON holds the element.
    fn present_in(&self, obj: &serde_json::Map<String, Value>) -> bool {
        if self.choice {
            return obj.keys().any(|k| {
                k.strip_prefix('_')
                    .unwrap_or(k)
                    .strip_prefix(self.name.as_str())
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
            });
        }
        obj.contains_key(&self.name)
            || self
                .underscored
                .as_ref()
                .is_some_and(|u| obj.contains_key(u))
    }
}

impl SearchParam {
    /// False when the resource holds none of the elements the expression starts from, so
    /// evaluating it would give nothing.
    fn may_match(&self, resource: &Value) -> bool {
        match (&self.starts, resource.as_object()) {
            (Some(keys), Some(obj)) => keys.iter().any(|k| k.present_in(obj)),
            _ => true,
        }
    }
}

/// A SearchParameter's expression as the index evaluates it: [`without_resolve`], and R4's one
/// cast to FHIRPath's System `DateTime` (`code-value-date`'s `value.as(DateTime)`, which no FHIR
/// `dateTime` value is) read as the cast to FHIR's `dateTime` that `value-date` on the same
/// element makes; as written, the parameter could never match.
pub fn search_form(expr: &str) -> String {
    without_resolve(expr).replace("as(DateTime)", "as(dateTime)")
}

/// Rewrites `where(resolve() is Type)` into a test of the reference text. A stored resource is
/// indexed on its own, with no Bundle to resolve against, and the type in `Type/id` (relative or
/// absolute) is what the FHIR search spec matches on — so `Condition?patient=` finds Conditions
/// whose subject is a Patient.
pub fn without_resolve(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find("where(resolve() is ") {
        let after = &rest[i + "where(resolve() is ".len()..];
        let Some(end) = after.find(')') else {
            break;
        };
        let ty = &after[..end];
        if !ty.chars().all(|c| c.is_ascii_alphanumeric()) {
            break;
        }
        out.push_str(&rest[..i]);
        out.push_str(&format!(
            "where(reference.startsWith('{ty}/') or reference.contains('/{ty}/'))"
        ));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The pseudo-parameter of the one row per resource that lists, as `,code,code,`, the reference
/// parameters holding a reference to the resource's own contained resources (`#id`).
///
/// Such a reference names no resource the server can search, chain to or include, so it is not
/// indexed as a reference: a JP-CLINS Observation points to three contained resources (encounter,
/// performer, specimen), and their rows were a sixth of its index rows. Only `:missing` needs to
/// know the element has a value, and reads it from this row. `#` is not valid in a
/// SearchParameter code, so no real parameter has this name.
pub const CONTAINED_REFERENCES: &str = "#contained";

/// One extracted index row.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// system, code (system may be empty).
    Token(String, String),
    /// Normalised string (see [`normalise`]) for prefix and `:contains`, and the exact text.
    String(String, String),
    /// Range in epoch milliseconds, inclusive.
    Date(i64, i64),
    /// Target type and id; see [`reference_key`].
    Reference(String, String),
    /// Numeric value.
    Number(f64),
    /// A quantity: value, system, code, unit (as written).
    Quantity {
        /// `Quantity.value`
        value: f64,
        /// `Quantity.system`
        system: String,
        /// `Quantity.code`
        code: String,
        /// `Quantity.unit`
        unit: String,
    },
    /// URI.
    Uri(String),
    /// One tuple of a composite parameter, a value per component.
    Composite(Vec<IndexValue>),
    /// A code and a quantity's value of one resource ([`SearchParam::code_value_rows`]); the
    /// quantity's unit is not kept (a search naming one reads the components' rows).
    CodeValue {
        /// The code's system (may be empty).
        system: String,
        /// The code.
        code: String,
        /// `Quantity.value`
        value: f64,
    },
}

impl Eq for IndexValue {}

impl IndexValue {
    /// A reference to one of the resource's own contained resources (`#id`, or `#` for the
    /// container itself).
    pub fn is_contained_reference(&self) -> bool {
        matches!(self, IndexValue::Reference(t, i) if t.is_empty() && i.starts_with('#'))
    }
}

impl std::hash::Hash for IndexValue {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        std::mem::discriminant(self).hash(h);
        match self {
            IndexValue::Token(a, b) | IndexValue::String(a, b) | IndexValue::Reference(a, b) => {
                a.hash(h);
                b.hash(h);
            }
            IndexValue::Date(lo, hi) => {
                lo.hash(h);
                hi.hash(h);
            }
            IndexValue::Number(n) => n.to_bits().hash(h),
            IndexValue::Quantity {
                value,
                system,
                code,
                unit,
            } => {
                value.to_bits().hash(h);
                system.hash(h);
                code.hash(h);
                unit.hash(h);
            }
            IndexValue::Uri(u) => u.hash(h),
            IndexValue::Composite(parts) => parts.hash(h),
            IndexValue::CodeValue {
                system,
                code,
                value,
            } => {
                system.hash(h);
                code.hash(h);
                value.to_bits().hash(h);
            }
        }
    }
}

/// The suffix of the pseudo-parameter holding `CodeableConcept.text` and `Coding.display` for `:text`.
pub const TEXT_SUFFIX: &str = ":text";
/// The suffix of the pseudo-parameter holding `Identifier.type` with the value, for `:of-type`.
pub const OF_TYPE_SUFFIX: &str = ":of-type";
/// The suffix of the pseudo-parameter holding `Reference.identifier`, for `:identifier`.
pub const IDENTIFIER_SUFFIX: &str = ":identifier";

/// How many tuples one element of a composite may produce (components with several codings multiply).
const MAX_TUPLES: usize = 64;

/// The search parameters of every resource type.
#[derive(Debug, Default)]
pub struct Indexer {
    by_type: HashMap<String, Vec<SearchParam>>,
    /// The embedded resources' parameters ([`SearchParam::embeds`]), by embedding type.
    embedded: HashMap<String, Vec<SearchParam>>,
}

impl Indexer {
    /// Compiles the SearchParameters of a registry.
    pub fn new(reg: &Registry) -> Indexer {
        let mut by_type: HashMap<String, Vec<SearchParam>> = HashMap::new();
        // Casts filter, as R4's parameters need (see `FhirPath::with_casts_as_filters`).
        let parse = |e: &str| {
            FhirPath::parse(&search_form(e))
                .ok()
                .map(|p| Arc::new(p.with_casts_as_filters()))
        };
        for sp in reg.definitions_of("SearchParameter") {
            let Some(kind) = sp
                .member("type")
                .and_then(Value::as_str)
                .and_then(ParamType::from_fhir)
            else {
                continue;
            };
            let (Some(code), Some(expr)) = (
                sp.member("code").and_then(Value::as_str),
                sp.member("expression").and_then(Value::as_str),
            ) else {
                continue;
            };
            let Some(parsed) = parse(expr) else {
                continue;
            };
            let strings = |k: &str| -> Vec<String> {
                sp.get(k)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            };
            let mut components = Vec::new();
            if kind == ParamType::Composite {
                for c in sp
                    .member("component")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let ckind = c
                        .member("definition")
                        .and_then(Value::as_str)
                        .and_then(|d| reg.resolve(d))
                        .and_then(|d| d.member("type").and_then(Value::as_str))
                        .and_then(ParamType::from_fhir);
                    let cexpr = c
                        .member("expression")
                        .and_then(Value::as_str)
                        .and_then(parse);
                    if let (Some(kind), Some(expr)) = (ckind, cexpr) {
                        if kind != ParamType::Composite {
                            components.push(Component { kind, expr });
                        }
                    }
                }
                // A composite whose parts cannot all be compiled would match wrongly: leave it out.
                let declared = sp
                    .member("component")
                    .and_then(Value::as_array)
                    .map(Vec::len);
                if components.is_empty()
                    || Some(components.len()) != declared
                    || components.len() > crate::COMPOSITE_PARTS
                {
                    continue;
                }
            }
            let targets = strings("target");
            for base in strings("base") {
                let parts = parts_for(&search_form(expr), &base);
                // Shared parameters (`clinical-patient` on 30 types) list every type's path:
                // each type evaluates only its own parts.
                let own = restrict_to(expr, &base)
                    .and_then(|e| parse(&e))
                    .unwrap_or_else(|| parsed.clone());
                let starts = StartKey::of(&own, &base, reg.model());
                let list = by_type.entry(base).or_default();
                if !list.iter().any(|p| p.code == code) {
                    list.push(SearchParam {
                        code: code.to_string(),
                        kind,
                        expr: own,
                        targets: targets.clone(),
                        components: components.clone(),
                        union_of: Vec::new(),
                        conjunction: Vec::new(),
                        code_value_rows: false,
                        part_params: Vec::new(),
                        narrowings: Vec::new(),
                        embeds: false,
                        parts,
                        starts,
                    });
                }
            }
        }
        for (base, list) in by_type.iter_mut() {
            for p in list.iter_mut() {
                p.embeds = embeds_resources(base, p, reg.model());
            }
            mark_unions(list);
            mark_narrowings(list);
            mark_conjunctions(base, list, reg.model());
            mark_part_params(base, list, reg.model());
        }
        let mut indexer = Indexer {
            by_type,
            embedded: HashMap::new(),
        };
        indexer.embedded = indexer.embedded_params();
        indexer
    }

    /// The parameters of the resources embedded by [`SearchParam::embeds`] parameters, per
    /// embedding type, under `{code}.{parameter}`: each a copy of the embedded type's parameter
    /// with every code it names (unions, narrowings, parts, components' rows) prefixed alike.
    fn embedded_params(&self) -> HashMap<String, Vec<SearchParam>> {
        let mut out: HashMap<String, Vec<SearchParam>> = HashMap::new();
        for (base, list) in &self.by_type {
            for p in list.iter().filter(|p| p.embeds) {
                let pre = |c: &str| format!("{}.{c}", p.code);
                for t in p.targets.iter().filter(|t| *t != base) {
                    for q in self.params(t).filter(|q| !q.embeds) {
                        let mut c = q.clone();
                        c.code = pre(&q.code);
                        c.union_of = q.union_of.iter().map(|x| pre(x)).collect();
                        c.narrowings = q.narrowings.iter().map(|x| pre(x)).collect();
                        for x in &mut c.part_params {
                            x.code = pre(&x.code);
                        }
                        for x in &mut c.conjunction {
                            x.code = pre(&x.code);
                        }
                        let list = out.entry(base.clone()).or_default();
                        if !list.iter().any(|x| x.code == c.code) {
                            list.push(c);
                        }
                    }
                }
            }
        }
        out
    }

    /// The parameters of a type (including those on `Resource` and `DomainResource`).
    pub fn params<'a>(&'a self, rt: &'a str) -> impl Iterator<Item = &'a SearchParam> + 'a {
        ["Resource", "DomainResource", rt]
            .into_iter()
            .flat_map(move |t| self.by_type.get(t).into_iter().flatten())
    }

    /// The resource types with a composite over the resource itself, searched through its
    /// components ([`SearchParam::conjunction`]) and, for a code with a quantity, rows of its own,
    /// sorted: a store indexed before either changed needs their rows again.
    pub fn resource_composite_types(&self) -> Vec<String> {
        self.types_with(over_the_resource)
    }

    /// The types, sorted, with a parameter for which `has(type, parameter)` holds.
    fn types_with(&self, has: impl Fn(&str, &SearchParam) -> bool) -> Vec<String> {
        let mut out: Vec<String> = self
            .by_type
            .iter()
            .filter(|(t, list)| list.iter().any(|p| has(t, p)))
            .map(|(t, _)| t.clone())
            .collect();
        out.sort();
        out
    }

    /// The types with a parameter that casts a repeating element
    /// (`(Observation.component.value as Quantity)`), sorted: indexed while casts were read
    /// strictly, their resources lack those rows. `Resource` or `DomainResource` among them
    /// stands for every type.
    pub fn repeating_cast_types(&self, model: &TypeModel) -> Vec<String> {
        // The kept expressions filter already: the casts are in their source text.
        let casts =
            |src: &str, rt: &str| FhirPath::parse(src).is_ok_and(|f| f.casts_may_repeat(model, rt));
        self.types_with(|t, p| {
            casts(p.expr.source(), t) || p.components.iter().any(|c| casts(c.expr.source(), t))
        })
    }

    /// The types with a parameter that computes its value rather than finding it in the
    /// resource (R4's `deceased`: `Patient.deceased.exists() and Patient.deceased != false`),
    /// sorted: before schema 9 such values gave no rows.
    pub fn computed_value_types(&self) -> Vec<String> {
        self.types_with(|_, p| p.starts.is_none() && p.kind != ParamType::Composite)
    }

    /// The types with a parameter embedding whole resources ([`SearchParam::embeds`]), sorted:
    /// before schema 10 their embedded resources' parameters had no rows.
    pub fn embedding_types(&self) -> Vec<String> {
        self.types_with(|_, p| p.embeds)
    }

    /// Looks up one parameter of a type, or of a resource it embeds (`composition.type` on
    /// `Bundle`; see [`SearchParam::embeds`]).
    pub fn param(&self, rt: &str, code: &str) -> Option<&SearchParam> {
        ["Resource", "DomainResource", rt]
            .into_iter()
            .filter_map(|t| self.by_type.get(t))
            .flatten()
            .find(|p| p.code == code)
            .or_else(|| self.embedded.get(rt)?.iter().find(|p| p.code == code))
    }

    /// All index rows of a resource: (parameter code, value). Besides one row per value, tokens
    /// add their text under `code:text`, identifiers their type under `code:of-type`, and references
    /// their identifier under `code:identifier`, so those modifiers are plain index lookups.
    /// References to the resource's own contained resources get no rows; one
    /// [`CONTAINED_REFERENCES`] row names the parameters that had them.
    pub fn extract(&self, reg: &Registry, resource: &Value) -> Vec<(String, IndexValue)> {
        self.extract_at(reg, resource, true)
    }

    /// [`Indexer::extract`]; `embed` is false inside an embedded resource, which embeds nothing
    /// further (a Bundle in a Bundle in a Bundle … has rows for the first level only).
    fn extract_at(
        &self,
        reg: &Registry,
        resource: &Value,
        embed: bool,
    ) -> Vec<(String, IndexValue)> {
        let rt = resource
            .member("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        let ctx = EvalContext::new(reg.model()).with_resource(resource);
        let model = reg.model();
        let mut out = Vec::new();
        let mut contained: Vec<&str> = Vec::new();
        for p in self.params(rt) {
            if (embed && matches!(p.code.as_str(), "_id" | "_lastUpdated"))
                || !p.union_of.is_empty()
                || !p.may_match(resource)
            {
                continue;
            }
            let Ok(items) = p.expr.evaluate_resource(&ctx, resource) else {
                continue;
            };
            if p.embeds {
                if embed {
                    self.embedded_rows(reg, rt, p, &items, &mut out);
                }
                continue;
            }
            for item in &items {
                if !p.conjunction.is_empty() {
                    conjunct_rows(p, &ctx, item, model, &mut out);
                    continue;
                }
                if p.kind == ParamType::Composite {
                    for t in tuples(p, &ctx, item, model) {
                        out.push((p.code.clone(), IndexValue::Composite(t)));
                    }
                    continue;
                }
                if !p.part_params.is_empty() {
                    if let Some(v) = name_or_address(item, model) {
                        let own = |k: &str| !p.part_params.iter().any(|x| x.key == k);
                        let mut rows = Vec::new();
                        string_rows_where(v, own, &mut rows);
                        out.extend(rows.into_iter().map(|row| (p.code.clone(), row)));
                        continue;
                    }
                }
                for v in values(p.kind, item, model) {
                    if v.is_contained_reference() {
                        contained.push(&p.code);
                    } else {
                        out.push((p.code.clone(), v));
                    }
                }
                extras(p, item, model, &mut out);
            }
        }
        for p in self.params(rt).filter(|p| p.code_value_rows) {
            code_value_rows(p, &mut out);
        }
        for p in self.params(rt).filter(|p| !p.narrowings.is_empty()) {
            drop_narrowed_rows(&p.code, &p.narrowings, &mut out);
        }
        if !contained.is_empty() {
            contained.dedup();
            out.push((
                CONTAINED_REFERENCES.to_string(),
                IndexValue::Reference(String::new(), format!(",{},", contained.join(","))),
            ));
        }
        out
    }
}

impl Indexer {
    /// The rows of the resources `p` embeds ([`SearchParam::embeds`]), under `{p.code}.{code}`:
    /// each embedded resource of one of `p`'s target types is indexed as if it were stored, its
    /// id and `meta.lastUpdated` included (`{p.code}._id`), which a stored resource keeps in its
    /// own row instead.
    fn embedded_rows(
        &self,
        reg: &Registry,
        rt: &str,
        p: &SearchParam,
        items: &[Item<'_>],
        out: &mut Vec<(String, IndexValue)>,
    ) {
        for item in items {
            let Item::Node(n) = item else { continue };
            let Some(sub) = n.value else { continue };
            let Some(t) = sub.member("resourceType").and_then(Value::as_str) else {
                continue;
            };
            if t == rt || !p.targets.iter().any(|x| x == t) {
                continue;
            }
            // The embedding parameter's own row names the resource (`composition:missing`,
            // `composition=Composition/{id}`, `_include=Bundle:composition`).
            let id = sub.member("id").and_then(Value::as_str).unwrap_or("");
            out.push((
                p.code.clone(),
                IndexValue::Reference(t.to_string(), id.to_string()),
            ));
            for (code, v) in self.extract_at(reg, sub, false) {
                let v = match v {
                    // The listing names the embedded parameters by their codes here.
                    IndexValue::Reference(ty, listed) if code == CONTAINED_REFERENCES => {
                        let listed: Vec<String> = listed
                            .split(',')
                            .filter(|c| !c.is_empty())
                            .map(|c| format!("{}.{c}", p.code))
                            .collect();
                        IndexValue::Reference(ty, format!(",{},", listed.join(",")))
                    }
                    v => v,
                };
                out.push((format!("{}.{code}", p.code), v));
            }
        }
    }
}

/// Whether a reference parameter's values are whole resources held inside the resource
/// (`Bundle.entry[0].resource`, `Bundle.entry.first().resource`): every part of its expression is
/// a path whose last element has the type `Resource`.
fn embeds_resources(rt: &str, p: &SearchParam, model: &TypeModel) -> bool {
    p.kind == ParamType::Reference && paths_end_at_resources(rt, &p.parts, model)
}

/// Whether every part is a path from `rt` whose last element has the type `Resource`.
fn paths_end_at_resources(rt: &str, parts: &[String], model: &TypeModel) -> bool {
    let resource_typed = |part: &str| {
        let path = part.replace(".first()", "").replace("[0]", "");
        let Some(rest) = path.strip_prefix(rt).and_then(|r| r.strip_prefix('.')) else {
            return false;
        };
        let mut ty = rt.to_string();
        let mut last: Option<&str> = None;
        for name in rest.split('.') {
            let Some(e) = model.element(&ty, name) else {
                return false;
            };
            let Some(next) = e.types.first() else {
                return false;
            };
            last = Some(name);
            ty = next.clone();
        }
        last.is_some() && ty == "Resource"
    };
    !parts.is_empty() && parts.iter().all(|x| resource_typed(x))
}

/// The top-level `|` parts of an expression.
fn top_level_parts(expr: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    for (i, c) in expr.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            '|' if !quoted && depth == 0 => {
                parts.push(&expr[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&expr[start..]);
    parts
}

/// Whether one `|` part of an expression starts at type `rt` (`Observation.code`,
/// `(Observation.value as Quantity)`).
fn rooted_at(part: &str, rt: &str) -> bool {
    let root = part.trim().trim_start_matches('(');
    root == rt || root.starts_with(&format!("{rt}.")) || root.starts_with(&format!("{rt} "))
}

/// The expression a parameter defined on several types has for `rt`: only the `|` parts rooted
/// at `rt`, unchanged. `None` when every part is (nothing to cut) or none is (a part rooted
/// elsewhere, such as `Resource.meta.tag`, is kept whole).
pub(crate) fn restrict_to(expr: &str, rt: &str) -> Option<String> {
    let parts = top_level_parts(expr);
    let rooted = |p: &str| rooted_at(p, rt);
    // A dropped part must name another concrete type: `Resource.…` applies to every type.
    let other_type = |p: &str| {
        let root: String = p
            .trim()
            .trim_start_matches('(')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        root.starts_with(|c: char| c.is_ascii_uppercase())
            && !matches!(root.as_str(), "Resource" | "DomainResource")
    };
    let own: Vec<&str> = parts.iter().copied().filter(|p| rooted(p)).collect();
    if own.is_empty()
        || own.len() == parts.len()
        || !parts.iter().all(|p| rooted(p) || other_type(p))
    {
        return None;
    }
    Some(own.iter().map(|p| p.trim()).collect::<Vec<_>>().join(" | "))
}

/// Splits an expression at its top-level `|` and keeps the parts about `rt` (a parameter defined on
/// several types lists each type's path), normalised for comparison.
fn parts_for(expr: &str, rt: &str) -> Vec<String> {
    let mut out: Vec<String> = top_level_parts(expr)
        .into_iter()
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| rooted_at(p, rt))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Marks the parameters of one type whose parts are exactly the union of two or more other
/// parameters' parts, of the same kind (and, for composites, the same components).
fn mark_unions(list: &mut [SearchParam]) {
    // Composites with the same base differ by their components (`code-value-quantity`, …).
    let same_components = |a: &SearchParam, b: &SearchParam| {
        a.components.len() == b.components.len()
            && a.components
                .iter()
                .zip(&b.components)
                .all(|(x, y)| x.kind == y.kind && x.expr.source() == y.expr.source())
    };
    let mut unions: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        if p.parts.len() < 2 {
            continue;
        }
        let same_shape = |q: &SearchParam| {
            q.kind == p.kind
                && q.code != p.code
                && !q.parts.is_empty()
                && q.parts.iter().all(|x| p.parts.contains(x))
                && same_components(q, p)
        };
        let members: Vec<&SearchParam> = list.iter().filter(|q| same_shape(q)).collect();
        let mut covered: Vec<&String> = members.iter().flat_map(|q| q.parts.iter()).collect();
        covered.sort();
        covered.dedup();
        // Exactly covered, by parameters that are not unions of each other.
        if covered.len() == p.parts.len() && members.len() >= 2 {
            unions.push((i, members.iter().map(|q| q.code.clone()).collect()));
        }
    }
    for (i, members) in unions {
        list[i].union_of = members;
    }
    // Parameters defined exactly alike (R4's `phonetic` and `name` on Patient, `subject` and
    // `patient` on DeviceUseStatement): the smallest code keeps the rows, the others read them,
    // so each value is indexed once.
    let same = |a: &SearchParam, b: &SearchParam| {
        a.kind == b.kind && a.parts == b.parts && same_components(a, b)
    };
    let aliases: Vec<(usize, String)> = list
        .iter()
        .enumerate()
        .filter(|(_, p)| p.union_of.is_empty() && !p.parts.is_empty() && !p.embeds)
        .filter_map(|(i, p)| {
            // Embedding parameters alike (`composition`, `message`) differ by their targets.
            list.iter()
                .filter(|q| q.union_of.is_empty() && !q.embeds && q.code < p.code && same(q, p))
                .map(|q| q.code.clone())
                .min()
                .map(|c| (i, c))
        })
        .collect();
    for (i, canonical) in aliases {
        list[i].union_of = vec![canonical];
    }
}

/// Marks the parameters narrowed by others ([`SearchParam::narrowings`]): `P` narrows `S` when its
/// one part is `S`'s one part followed by a final `.where(…)`, both of one kind (reference or
/// token), each an ordinary parameter (no union, composite or name parts).
fn mark_narrowings(list: &mut [SearchParam]) {
    let plain = |p: &SearchParam| {
        matches!(p.kind, ParamType::Reference | ParamType::Token)
            && p.union_of.is_empty()
            && p.part_params.is_empty()
            && p.parts.len() == 1
    };
    let mut found: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, wide) in list.iter().enumerate() {
        if !plain(wide) {
            continue;
        }
        let prefix = format!("{}.where", wide.parts[0]);
        let narrower: Vec<String> = list
            .iter()
            .filter(|q| plain(q) && q.kind == wide.kind && q.code != wide.code)
            .filter(|q| {
                q.parts[0]
                    .strip_prefix(&prefix)
                    .is_some_and(|rest| rest.starts_with('(') && encloses(rest))
            })
            .map(|q| q.code.clone())
            .collect();
        if !narrower.is_empty() {
            found.push((i, narrower));
        }
    }
    for (i, narrower) in found {
        list[i].narrowings = narrower;
    }
}

/// Drops the rows of `code` (and of its pseudo-parameters, `code:identifier` …) that a narrower
/// parameter holds too, under its own code with the same suffix: a search on `code` reads those.
fn drop_narrowed_rows(code: &str, narrowings: &[String], out: &mut Vec<(String, IndexValue)>) {
    // The suffix of a row of `base` or of one of its pseudo-parameters.
    fn suffix<'c>(row_code: &'c str, base: &str) -> Option<&'c str> {
        row_code
            .strip_prefix(base)
            .filter(|s| s.is_empty() || s.starts_with(':'))
    }
    // Positions of the narrower parameters' rows (none when, say, the subject is a Group).
    let narrow: Vec<usize> = (0..out.len())
        .filter(|&i| narrowings.iter().any(|n| suffix(&out[i].0, n).is_some()))
        .collect();
    if narrow.is_empty() {
        return;
    }
    let held = |c: &str, v: &IndexValue| {
        suffix(c, code).is_some_and(|sfx| {
            narrow.iter().any(|&j| {
                let (nc, nv) = &out[j];
                nv == v && narrowings.iter().any(|n| suffix(nc, n) == Some(sfx))
            })
        })
    };
    let drop: Vec<bool> = out.iter().map(|(c, v)| held(c, v)).collect();
    let mut i = 0;
    out.retain(|_| {
        i += 1;
        !drop[i - 1]
    });
}

/// Marks the composites over the resource itself and finds where each component's values are:
/// a parameter of the type whose parts are the component's path (`code` for `code`,
/// `value-concept` for `value.as(CodeableConcept)`), or rows of the component's own. A code with
/// a quantity also gets rows of its own ([`SearchParam::code_value_rows`]).
fn mark_conjunctions(rt: &str, list: &mut [SearchParam], model: &TypeModel) {
    let mut found: Vec<(usize, Vec<Conjunct>)> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        if !over_the_resource(rt, p) {
            continue;
        }
        let conjuncts = p
            .components
            .iter()
            .enumerate()
            .map(|(n, c)| {
                let want = component_parts(rt, c.expr.source());
                let same_path = |q: &&SearchParam| {
                    q.kind == c.kind && {
                        let mut have: Vec<String> = q
                            .parts
                            .iter()
                            .map(|x| normal_part(x))
                            .filter(|x| !gives_no_values(c.kind, x, model))
                            .collect();
                        have.sort();
                        have.dedup();
                        have == want
                    }
                };
                match list.iter().find(same_path) {
                    Some(q) => Conjunct {
                        code: q.code.clone(),
                        own_rows: false,
                    },
                    None => Conjunct {
                        code: format!("{}#{n}", p.code),
                        own_rows: true,
                    },
                }
            })
            .collect();
        found.push((i, conjuncts));
    }
    for (i, conjuncts) in found {
        list[i].conjunction = conjuncts;
        let p = &list[i];
        list[i].code_value_rows = code_with_quantity(p)
            && p.components.get(1).is_some_and(|c| {
                component_parts(rt, c.expr.source())
                    .iter()
                    .all(|part| one_value(rt, part, model))
            });
    }
}

/// Whether a path (in [`normal_part`] form) gives at most one value per resource: one element of
/// the type with `max` 1, optionally cast (`Observation.value.as(Quantity)`). A composite of a code
/// and such a quantity has one row per code and resource, which a search can read in row-id order.
fn one_value(rt: &str, part: &str, model: &TypeModel) -> bool {
    let Some(rest) = part.strip_prefix(rt).and_then(|r| r.strip_prefix('.')) else {
        return false;
    };
    let (elem, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let cast = tail.is_empty()
        || tail
            .strip_prefix("as(")
            .and_then(|t| t.strip_suffix(')'))
            .is_some_and(|t| t.chars().all(|c| c.is_ascii_alphanumeric()));
    cast && model.element(rt, elem).is_some_and(|e| !e.many)
}

/// Whether a parameter is a composite over the resource itself (`code-value-quantity` is defined
/// on `Observation`), not over an element of it or a union of others.
fn over_the_resource(rt: &str, p: &SearchParam) -> bool {
    p.kind == ParamType::Composite && p.union_of.is_empty() && p.parts == [rt]
}

/// Whether a composite pairs a token with a quantity (and nothing else).
fn code_with_quantity(p: &SearchParam) -> bool {
    matches!(
        p.components
            .iter()
            .map(|c| c.kind)
            .collect::<Vec<_>>()
            .as_slice(),
        [ParamType::Token, ParamType::Quantity]
    )
}

/// Finds the string parameters over a HumanName or Address element of the type whose parts have
/// parameters of their own (`Patient.name` and `Patient.name.family`).
fn mark_part_params(rt: &str, list: &mut [SearchParam], model: &TypeModel) {
    let mut found: Vec<(usize, Vec<PartParam>)> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let [part] = p.parts.as_slice() else { continue };
        if p.kind != ParamType::String || !p.union_of.is_empty() {
            continue;
        }
        let Some(elem) = part.strip_prefix(&format!("{rt}.")) else {
            continue;
        };
        let named = model.element(rt, elem).is_some_and(|e| {
            !e.choice && e.types.iter().all(|t| t == "HumanName" || t == "Address")
        });
        if !named {
            continue;
        }
        let parts: Vec<PartParam> = STRING_PART_KEYS
            .iter()
            .filter_map(|k| {
                let path = format!("{part}.{k}");
                list.iter()
                    .find(|q| {
                        q.kind == ParamType::String
                            && q.union_of.is_empty()
                            && q.part_params.is_empty()
                            && q.parts == [path.as_str()]
                    })
                    .map(|q| PartParam {
                        key: k.to_string(),
                        code: q.code.clone(),
                    })
            })
            .collect();
        if !parts.is_empty() {
            found.push((i, parts));
        }
    }
    for (i, parts) in found {
        list[i].part_params = parts;
    }
}

/// The value of a HumanName or Address item.
fn name_or_address<'v>(item: &Item<'v>, model: &TypeModel) -> Option<&'v Value> {
    let Item::Node(n) = item else { return None };
    matches!(model.type_name(n.ty), "HumanName" | "Address")
        .then_some(n.value)
        .flatten()
}

/// The rows of a conjunctive composite's components that are kept under its own codes.
fn conjunct_rows<'a>(
    p: &SearchParam,
    ctx: &EvalContext<'a>,
    item: &Item<'a>,
    model: &TypeModel,
    out: &mut Vec<(String, IndexValue)>,
) {
    for (c, j) in p.components.iter().zip(&p.conjunction) {
        if !j.own_rows {
            continue;
        }
        let Ok(items) = c.expr.evaluate(ctx, vec![item.clone()]) else {
            continue;
        };
        for v in items.iter().flat_map(|i| values(c.kind, i, model)) {
            out.push((j.code.clone(), v));
        }
    }
}

/// The rows of a composite of a code and a quantity ([`SearchParam::code_value_rows`]): each code
/// of the resource with each quantity's value, made from its components' rows (the same paths,
/// already extracted) rather than by evaluating them again.
fn code_value_rows(p: &SearchParam, out: &mut Vec<(String, IndexValue)>) {
    let [code, value] = p.conjunction.as_slice() else {
        return;
    };
    let values: Vec<f64> = out
        .iter()
        .filter(|(c, _)| *c == value.code)
        .filter_map(|(_, v)| match v {
            IndexValue::Quantity { value, .. } => Some(*value),
            _ => None,
        })
        .collect();
    if values.is_empty() {
        return;
    }
    let mut rows = Vec::new();
    for (c, v) in out.iter() {
        let (IndexValue::Token(system, code), true) = (v, *c == code.code) else {
            continue;
        };
        for value in &values {
            if rows.len() < MAX_TUPLES {
                rows.push((
                    p.code.clone(),
                    IndexValue::CodeValue {
                        system: system.clone(),
                        code: code.clone(),
                        value: *value,
                    },
                ));
            }
        }
    }
    out.extend(rows);
}

/// A component's expression as parts rooted at the type (`value.as(Quantity)` on Observation
/// gives `Observation.value.as(Quantity)`), in [`normal_part`] form, sorted.
fn component_parts(rt: &str, expr: &str) -> Vec<String> {
    let mut out: Vec<String> = top_level_parts(expr)
        .into_iter()
        .map(|p| normal_part(&format!("{rt}.{}", p.trim())))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One `|` part in a form that compares equal however the definitions spell it: spaces
/// collapsed, enclosing parentheses dropped, `X as T` written `X.as(T)`.
fn normal_part(part: &str) -> String {
    let mut p = part.split_whitespace().collect::<Vec<_>>().join(" ");
    while p.len() >= 2 && p.starts_with('(') && p.ends_with(')') && encloses(&p) {
        p = p[1..p.len() - 1].trim().to_string();
    }
    if let Some((path, ty)) = p.rsplit_once(" as ") {
        if !path.contains([' ', '(']) && ty.chars().all(|c| c.is_ascii_alphanumeric()) {
            return format!("{path}.as({ty})");
        }
    }
    p
}

/// True when the opening parenthesis at the start closes at the very end.
fn encloses(p: &str) -> bool {
    let mut depth = 0i32;
    for (i, c) in p.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 && i + 1 < p.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// A part that cannot give a value of `kind`: a quantity parameter's cast to a type with no
/// `value` element other than Money (`value.as(SampledData)` in `value-quantity`), which
/// [`values`] never turns into a row.
fn gives_no_values(kind: ParamType, part: &str, model: &TypeModel) -> bool {
    let Some(ty) = part
        .strip_suffix(')')
        .and_then(|p| p.rsplit_once(".as("))
        .map(|(_, t)| t)
    else {
        return false;
    };
    kind == ParamType::Quantity
        && ty != "Money"
        && model.get(ty).is_some()
        && !model.is_primitive(ty)
        && model.element(ty, "value").is_none()
}

/// The value tuples of one element of a composite: the cross product of its components' values.
fn tuples<'a>(
    p: &SearchParam,
    ctx: &EvalContext<'a>,
    item: &Item<'a>,
    model: &TypeModel,
) -> Vec<Vec<IndexValue>> {
    let mut acc: Vec<Vec<IndexValue>> = vec![Vec::new()];
    for c in &p.components {
        let Ok(items) = c.expr.evaluate(ctx, vec![item.clone()]) else {
            return Vec::new();
        };
        let vals: Vec<IndexValue> = items
            .iter()
            .flat_map(|i| values(c.kind, i, model))
            .collect();
        if vals.is_empty() {
            return Vec::new();
        }
        let mut next = Vec::new();
        for prefix in &acc {
            for v in &vals {
                if next.len() >= MAX_TUPLES {
                    break;
                }
                let mut t = prefix.clone();
                t.push(v.clone());
                next.push(t);
            }
        }
        acc = next;
    }
    acc
}

/// The pseudo-parameter rows behind `:text`, `:of-type` and `:identifier`.
fn extras(
    p: &SearchParam,
    item: &Item<'_>,
    model: &TypeModel,
    out: &mut Vec<(String, IndexValue)>,
) {
    let Item::Node(n) = item else { return };
    let Some(v) = n.value else { return };
    let ty = model.type_name(n.ty);
    match (p.kind, ty) {
        (ParamType::Token, "CodeableConcept") => {
            let texts = s(v, "text").into_iter().chain(
                v.member("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| s(c, "display")),
            );
            for t in texts {
                out.push((
                    format!("{}{TEXT_SUFFIX}", p.code),
                    IndexValue::String(normalise(t), t.to_string()),
                ));
            }
        }
        (ParamType::Token, "Coding") => {
            if let Some(t) = s(v, "display") {
                out.push((
                    format!("{}{TEXT_SUFFIX}", p.code),
                    IndexValue::String(normalise(t), t.to_string()),
                ));
            }
        }
        (ParamType::Token, "Identifier") => {
            let value = s(v, "value").unwrap_or("");
            for c in v
                .pointer("/type/coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.push((
                    format!("{}{OF_TYPE_SUFFIX}", p.code),
                    IndexValue::Token(
                        format!(
                            "{}|{}",
                            s(c, "system").unwrap_or(""),
                            s(c, "code").unwrap_or("")
                        ),
                        value.to_string(),
                    ),
                ));
            }
        }
        (ParamType::Reference, "Reference") => {
            if let Some(i) = v.member("identifier") {
                out.push((
                    format!("{}{IDENTIFIER_SUFFIX}", p.code),
                    IndexValue::Token(
                        s(i, "system").unwrap_or("").into(),
                        s(i, "value").unwrap_or("").into(),
                    ),
                ));
            }
        }
        _ => {}
    }
}

/// The (type, id) a reference or canonical is indexed and searched under. Relative `Type/id` gives
/// `(Type, id)`; an absolute `http://base/Type/id` keeps its base, `(Type, url)`, because it names
/// a resource on that server; a version (`/_history/n`, `|version`) is dropped; anything else
/// (`#contained`, `urn:uuid:…`, a bare id) is `("", text)`.
pub fn reference_key(r: &str) -> (String, String) {
    let r = r.split("/_history/").next().unwrap_or(r);
    let r = if r.contains("://") {
        r.split('|').next().unwrap_or(r)
    } else {
        r
    };
    if r.starts_with('#') || r.starts_with("urn:") {
        return (String::new(), r.to_string());
    }
    let mut parts = r.rsplitn(3, '/');
    let (id, ty, base) = (parts.next(), parts.next(), parts.next());
    match (id, ty) {
        (Some(id), Some(ty))
            if !id.is_empty()
                && ty.starts_with(|c: char| c.is_ascii_uppercase())
                && ty.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            if base.is_some_and(|b| b.contains("://")) {
                (ty.to_string(), r.to_string())
            } else if base.is_none() {
                (ty.to_string(), id.to_string())
            } else {
                (String::new(), r.to_string())
            }
        }
        _ => (String::new(), r.to_string()),
    }
}

/// Normalises a string for matching: compatibility forms folded (full-width ｱ and Ａ, half-width ｶﾞ
/// become ア, A and ガ), Latin accents removed (é → e) while Japanese voicing marks stay (ガ ≠ カ),
/// lower case, whitespace runs folded to one space.
pub fn normalise(s: &str) -> String {
    // Most text (ASCII, kana, kanji) is left alone by both normal forms and the accent filter:
    // it needs only the whitespace and case folding, without two decompositions per string.
    if s.chars().all(normal_form_stable) {
        let mut out = String::with_capacity(s.len());
        for (i, word) in s.split_whitespace().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(word);
        }
        // Kana and kanji have no case: lowering the ASCII letters is all `to_lowercase` does.
        out.make_ascii_lowercase();
        return out;
    }
    normalise_any(s)
}

/// Characters that NFKD, the accent filter and NFKC all leave as they are (checked against
/// [`normalise_any`] for each of them): ASCII, hiragana, katakana, the prolonged sound mark
/// and the CJK unified ideographs. Voiced kana (ガ) decompose and compose back to themselves.
fn normal_form_stable(c: char) -> bool {
    c.is_ascii()
        || matches!(c, '\u{3041}'..='\u{3096}' | '\u{30a1}'..='\u{30fa}' | '\u{30fc}' | '\u{4e00}'..='\u{9fff}')
}

/// [`normalise`] for any text.
fn normalise_any(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let stripped: String = s
        .nfkd()
        .filter(|c| !('\u{300}'..='\u{36f}').contains(c))
        .collect();
    let composed: String = stripped.nfkc().collect();
    composed
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The inclusive epoch-millisecond range a date or date-time stands for. Times without a zone are read
/// in Japan Standard Time (+09:00), the service's zone.
pub fn date_range(d: &DateTime) -> Option<(i64, i64)> {
    let lo = edge(d, false)?;
    let hi = edge(d, true)?;
    Some((lo, hi))
}

fn edge(d: &DateTime, high: bool) -> Option<i64> {
    use chrono::{NaiveDate, TimeZone};
    let month = if d.precision >= Precision::Month {
        d.month
    } else if high {
        12
    } else {
        1
    };
    let last_day = |y: i32, m: u32| -> u32 {
        let next = if m == 12 {
            NaiveDate::from_ymd_opt(y + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(y, m + 1, 1)
        };
        next.and_then(|n| n.pred_opt())
            .map(|p| chrono::Datelike::day(&p))
            .unwrap_or(28)
    };
    let day = if d.precision >= Precision::Day {
        d.day
    } else if high {
        last_day(d.year, month)
    } else {
        1
    };
    let (h, mi, s, ms) = match d.precision {
        Precision::Year | Precision::Month | Precision::Day => {
            if high {
                (23, 59, 59, 999)
            } else {
                (0, 0, 0, 0)
            }
        }
        Precision::Hour => (
            d.hour,
            if high { 59 } else { 0 },
            if high { 59 } else { 0 },
            if high { 999 } else { 0 },
        ),
        Precision::Minute => (
            d.hour,
            d.minute,
            if high { 59 } else { 0 },
            if high { 999 } else { 0 },
        ),
        Precision::Second => (
            d.hour,
            d.minute,
            d.second.min(59),
            if high { 999 } else { 0 },
        ),
        Precision::Millisecond => (d.hour, d.minute, d.second.min(59), d.millis),
    };
    let naive = NaiveDate::from_ymd_opt(d.year, month, day)?.and_hms_milli_opt(h, mi, s, ms)?;
    let offset = chrono::FixedOffset::east_opt(d.tz.unwrap_or(9 * 60) * 60)?;
    Some(
        offset
            .from_local_datetime(&naive)
            .single()?
            .timestamp_millis(),
    )
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn token(c: &Value, sys: &str, code: &str) -> IndexValue {
    IndexValue::Token(
        s(c, sys).unwrap_or("").into(),
        s(c, code).unwrap_or("").into(),
    )
}

/// How many of [`STRING_PART_KEYS`] hold one text; the rest hold lists.
const SINGLE_PARTS: usize = 7;

/// The parts of a HumanName or Address a string search matches: one text each, then lists.
const STRING_PART_KEYS: [&str; 11] = [
    "text",
    "family",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
    "given",
    "prefix",
    "suffix",
    "line",
];

fn string_rows(v: &Value, out: &mut Vec<IndexValue>) {
    string_rows_where(v, |_| true, out);
}

/// The rows of the parts of a HumanName or Address whose key passes `keep`.
fn string_rows_where(v: &Value, keep: impl Fn(&str) -> bool, out: &mut Vec<IndexValue>) {
    let (single, lists) = STRING_PART_KEYS.split_at(SINGLE_PARTS);
    let mut push = |x: &str| out.push(IndexValue::String(normalise(x), x.to_string()));
    for k in single.iter().filter(|k| keep(k)) {
        if let Some(x) = s(v, k) {
            push(x);
        }
    }
    for k in lists.iter().filter(|k| keep(k)) {
        v.get(*k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .for_each(&mut push);
    }
}

fn range_of(x: &str) -> Option<(i64, i64)> {
    DateTime::parse(x, false).and_then(|d| date_range(&d))
}

fn number_of(v: Option<&Value>) -> Option<f64> {
    match v {
        Some(Value::Number(n)) => n.as_f64(),
        _ => None,
    }
}

/// The row of a value the expression computed rather than found in the resource: R4's
/// `deceased` is `Patient.deceased.exists() and Patient.deceased != false`, a System Boolean.
fn system_values(kind: ParamType, item: &Item<'_>) -> Vec<IndexValue> {
    let row = match (kind, item) {
        (ParamType::Token, Item::Bool(b)) => IndexValue::Token(String::new(), b.to_string()),
        (ParamType::Token, Item::Str(x)) => IndexValue::Token(String::new(), x.clone()),
        (ParamType::String, Item::Str(x)) => IndexValue::String(normalise(x), x.clone()),
        (ParamType::Uri, Item::Str(x)) => IndexValue::Uri(x.clone()),
        (ParamType::Number, Item::Int(i) | Item::Long(i)) => IndexValue::Number(*i as f64),
        (ParamType::Number, Item::Dec(d)) => match d.to_string().parse() {
            Ok(f) => IndexValue::Number(f),
            Err(_) => return Vec::new(),
        },
        _ => return Vec::new(),
    };
    vec![row]
}

/// The index values of one item a parameter's expression selected.
pub(crate) fn values(kind: ParamType, item: &Item<'_>, model: &TypeModel) -> Vec<IndexValue> {
    let (node_ty, v) = match item {
        Item::Node(n) => (model.type_name(n.ty), n.value),
        other => return system_values(kind, other),
    };
    let Some(v) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    match kind {
        ParamType::Token => match (node_ty, v) {
            ("Coding", c) => out.push(token(c, "system", "code")),
            ("CodeableConcept", cc) => {
                for c in cc
                    .member("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.push(token(c, "system", "code"));
                }
            }
            ("Identifier", i) => out.push(token(i, "system", "value")),
            ("ContactPoint", c) => out.push(token(c, "system", "value")),
            (_, Value::String(code)) => out.push(IndexValue::Token(String::new(), code.clone())),
            (_, Value::Bool(b)) => out.push(IndexValue::Token(String::new(), b.to_string())),
            _ => {}
        },
        ParamType::String => match (node_ty, v) {
            ("HumanName" | "Address", n) => string_rows(n, &mut out),
            (_, Value::String(x)) => out.push(IndexValue::String(normalise(x), x.clone())),
            _ => {}
        },
        ParamType::Date => match (node_ty, v) {
            ("Period", p) => {
                let lo = s(p, "start").and_then(range_of).map(|r| r.0);
                let hi = s(p, "end").and_then(range_of).map(|r| r.1);
                if lo.is_some() || hi.is_some() {
                    out.push(IndexValue::Date(
                        lo.unwrap_or(OPEN_START),
                        hi.unwrap_or(OPEN_END),
                    ));
                }
            }
            ("Timing", t) => {
                for e in t
                    .member("event")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    if let Some((lo, hi)) = range_of(e) {
                        out.push(IndexValue::Date(lo, hi));
                    }
                }
            }
            (_, Value::String(x)) => {
                if let Some((lo, hi)) = range_of(x) {
                    out.push(IndexValue::Date(lo, hi));
                }
            }
            _ => {}
        },
        ParamType::Reference => {
            let r = match v {
                Value::Object(_) => s(v, "reference"),
                Value::String(x) => Some(x.as_str()),
                _ => None,
            };
            if let Some(r) = r {
                let (t, i) = reference_key(r);
                out.push(IndexValue::Reference(t, i));
            }
        }
        ParamType::Number => {
            if let Some(n) = number_of(Some(v)) {
                out.push(IndexValue::Number(n));
            }
        }
        ParamType::Quantity => match (node_ty, v) {
            ("Money", m) => {
                if let Some(value) = number_of(m.member("value")) {
                    let cur = s(m, "currency").unwrap_or("").to_string();
                    out.push(IndexValue::Quantity {
                        value,
                        system: "urn:iso:std:iso:4217".into(),
                        code: cur.clone(),
                        unit: cur,
                    });
                }
            }
            (_, Value::Object(q)) => {
                if let Some(value) = number_of(q.member("value")) {
                    out.push(IndexValue::Quantity {
                        value,
                        system: s(v, "system").unwrap_or("").into(),
                        code: s(v, "code").unwrap_or("").into(),
                        unit: s(v, "unit").unwrap_or("").into(),
                    });
                }
            }
            _ => {}
        },
        ParamType::Uri => {
            if let Value::String(x) = v {
                // One row, also for a versioned canonical (`url|1`): a search by the bare URL
                // finds it by prefix (`url|…`), as two rows per profile cost ingest 7 % of its rows.
                out.push(IndexValue::Uri(x.clone()));
            }
        }
        ParamType::Composite => {}
    }
    out
}

/// The low end of a period without a start (and the high end without an end): far enough from any
/// real date, near enough to stay exact as a double in composite rows.
pub const OPEN_START: i64 = -(1 << 52);
/// See [`OPEN_START`].
pub const OPEN_END: i64 = 1 << 52;

#[cfg(test)]
mod tests {
    #[test]
    fn shared_parameters_keep_only_their_own_parts() {
        use super::restrict_to;
        let e = "AllergyIntolerance.patient | Observation.subject.where(resolve() is Patient) | (Observation.value as Quantity) | Procedure.subject";
        assert_eq!(
            restrict_to(e, "Observation").as_deref(),
            Some(
                "Observation.subject.where(resolve() is Patient) | (Observation.value as Quantity)"
            )
        );
        assert_eq!(
            restrict_to(e, "Procedure").as_deref(),
            Some("Procedure.subject")
        );
        // Nothing to cut, nothing rooted here, or a part that applies to every type.
        assert_eq!(restrict_to("Patient.name | Patient.alias", "Patient"), None);
        assert_eq!(restrict_to(e, "Encounter"), None);
        assert_eq!(
            restrict_to("Observation.code | Resource.meta.tag", "Observation"),
            None
        );
        // A `|` inside a string or a function call is not a part boundary.
        assert_eq!(
            restrict_to(
                "Observation.code.where(system = 'a|b') | Condition.code",
                "Observation"
            )
            .as_deref(),
            Some("Observation.code.where(system = 'a|b')")
        );
    }

    use super::{normal_form_stable, normalise, normalise_any, reference_key, without_resolve};
    use proptest::prelude::*;

    /// The shortcut gives what the full normalisation gives, for each character it takes.
    #[test]
    fn the_shortcut_matches_the_full_form_for_each_character() {
        let stable: Vec<char> = (0..=0x10ffff_u32)
            .filter_map(char::from_u32)
            .filter(|c| normal_form_stable(*c))
            .collect();
        assert!(stable.len() > 21_000, "{}", stable.len());
        for c in stable {
            let s = format!("x{c}Y");
            assert_eq!(normalise(&s), normalise_any(&s), "U+{:04X}", c as u32);
        }
    }

    proptest! {
        /// Mixed text: the shortcut and the full normalisation agree, whichever one runs.
        #[test]
        fn normalise_agrees_with_the_full_form(
            s in "[ a-zA-Z0-9\t\u{3000}\u{3041}-\u{3096}\u{30a1}-\u{30ff}\u{4e00}-\u{4e20}\u{ff66}-\u{ff9f}\u{ff21}-\u{ff3a}\u{e9}\u{301}\u{3099}]{0,24}"
        ) {
            prop_assert_eq!(normalise(&s), normalise_any(&s));
        }
    }

    #[test]
    fn reference_keys() {
        let k = |r: &str| reference_key(r);
        let p = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(k("Patient/123"), p("Patient", "123"));
        assert_eq!(k("Patient/123/_history/4"), p("Patient", "123"));
        assert_eq!(
            k("http://other.example/fhir/Patient/9"),
            p("Patient", "http://other.example/fhir/Patient/9")
        );
        assert_eq!(k("urn:uuid:abc"), p("", "urn:uuid:abc"));
        assert_eq!(k("#contained"), p("", "#contained"));
        assert_eq!(k("123"), p("", "123"));
        assert_eq!(k("a/b/c"), p("", "a/b/c"));
        assert_eq!(
            k("http://hl7.org/fhir/StructureDefinition/Patient|4.0.1"),
            p(
                "StructureDefinition",
                "http://hl7.org/fhir/StructureDefinition/Patient"
            )
        );
    }

    #[test]
    fn normalisation_folds_width_case_and_latin_accents_only() {
        assert_eq!(normalise("ｻﾄｳ  Ｔａｒｏ"), "サトウ taro");
        assert_eq!(normalise("ｶﾞｸ"), "ガク");
        assert_ne!(normalise("ガ"), normalise("カ"));
        assert_eq!(normalise("Ève"), "eve");
    }

    #[test]
    fn resolve_is_becomes_a_reference_test() {
        assert_eq!(
            without_resolve("Condition.subject.where(resolve() is Patient) | X.y"),
            "Condition.subject.where(reference.startsWith('Patient/') or reference.contains('/Patient/')) | X.y"
        );
        assert_eq!(without_resolve("Patient.link.other"), "Patient.link.other");
        // Not a plain type name: left alone rather than half-rewritten.
        assert_eq!(
            without_resolve("a.where(resolve() is (x))"),
            "a.where(resolve() is (x))"
        );
    }
}

#[cfg(test)]
mod union_tests {
    use super::Indexer;

    #[test]
    fn combo_parameters_read_their_members_rows() {
        let idx = Indexer::new(kizuna_fhir::Registry::builtin());
        let union = |code: &str| {
            let mut u = idx
                .param("Observation", code)
                .map(|p| p.union_of.clone())
                .unwrap_or_default();
            u.sort();
            u
        };
        assert_eq!(union("combo-code"), vec!["code", "component-code"]);
        assert_eq!(
            union("combo-value-quantity"),
            vec!["component-value-quantity", "value-quantity"]
        );
        assert_eq!(
            union("combo-code-value-quantity"),
            vec!["code-value-quantity", "component-code-value-quantity"]
        );
        // Parameters that are not unions keep their own rows.
        assert!(union("code").is_empty() && union("value-quantity").is_empty());
        assert!(idx
            .param("Patient", "name")
            .is_some_and(|p| p.union_of.is_empty()));
        // Parameters defined exactly alike share one set of rows, kept by the smallest code.
        let of = |rt: &str, code: &str| {
            idx.param(rt, code)
                .map(|p| p.union_of.clone())
                .unwrap_or_default()
        };
        assert_eq!(of("Patient", "phonetic"), vec!["name"]);
        assert_eq!(of("Practitioner", "phonetic"), vec!["name"]);
        assert_eq!(of("DeviceUseStatement", "subject"), vec!["patient"]);
        assert_eq!(of("CodeSystem", "url"), vec!["system"]);
        assert!(of("DeviceUseStatement", "patient").is_empty());
        // Alike in expression, not in components: composites keep their own rows.
        assert!(of("Observation", "code-value-quantity").is_empty());
        assert!(of("Observation", "code-value-concept").is_empty());
        // A restricted reference (`subject.where(resolve() is Patient)`) is not its base.
        assert!(of("Observation", "patient").is_empty());
        let rows = idx.extract(
            kizuna_fhir::Registry::builtin(),
            &serde_json::json!({"resourceType": "Patient",
                "name": [{"family": "山田", "given": ["太郎"]}]}),
        );
        // `name` (and `phonetic`, which reads it) find the family name in `family`'s rows.
        assert!(rows.iter().any(|(c, _)| c == "family"));
        assert!(!rows.iter().any(|(c, _)| c == "phonetic" || c == "name"));
    }

    #[test]
    fn composites_over_the_resource_use_their_components_rows() {
        use super::{Conjunct, IndexValue};
        let reg = kizuna_fhir::Registry::builtin();
        let idx = Indexer::new(reg);
        let conj = |code: &str| {
            idx.param("Observation", code)
                .map(|p| {
                    p.conjunction
                        .iter()
                        .map(|Conjunct { code, own_rows }| (code.as_str(), *own_rows))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        // Same path as a parameter of the type: its rows (`SampledData` gives no quantity).
        assert_eq!(
            conj("code-value-quantity"),
            vec![("code", false), ("value-quantity", false)]
        );
        assert_eq!(
            conj("code-value-concept"),
            vec![("code", false), ("value-concept", false)]
        );
        assert_eq!(
            conj("code-value-date"),
            vec![("code", false), ("value-date", false)]
        );
        // `value-string` also reads a CodeableConcept's text: the component keeps rows of its own.
        assert_eq!(
            conj("code-value-string"),
            vec![("code", false), ("code-value-string#1", true)]
        );
        // Over an element, or a union: tuples as before.
        for code in ["component-code-value-quantity", "combo-code-value-quantity"] {
            assert!(conj(code).is_empty(), "{code}");
        }
        assert!(idx
            .param("Group", "characteristic-value")
            .is_some_and(|p| p.conjunction.is_empty()));
        assert_eq!(
            idx.resource_composite_types(),
            vec!["Observation".to_string()]
        );
        let rows = |value: serde_json::Value| {
            let mut o = serde_json::json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "urn:x", "code": "c"}]},
                "component": [{"code": {"coding": [{"system": "urn:x", "code": "k"}]},
                    "valueQuantity": {"value": 1}}]});
            if let (Some(m), Some(v)) = (o.as_object_mut(), value.as_object()) {
                m.extend(v.clone());
            }
            idx.extract(reg, &o)
        };
        let quantity = rows(serde_json::json!({"valueQuantity": {"value": 5}}));
        let mut tuples: Vec<&str> = quantity
            .iter()
            .filter(|(_, v)| matches!(v, IndexValue::Composite(_)))
            .map(|(c, _)| c.as_str())
            .collect();
        tuples.sort();
        assert_eq!(tuples, vec!["component-code-value-quantity"]);
        // A code with a quantity: a row per code, with the value.
        let rows_of = |code: &str| idx.param("Observation", code).map(|p| p.code_value_rows);
        assert_eq!(rows_of("code-value-quantity"), Some(true));
        for code in [
            "code-value-concept",
            "code-value-string",
            "component-code-value-quantity",
        ] {
            assert_eq!(rows_of(code), Some(false), "{code}");
        }
        let pairs: Vec<&IndexValue> = quantity
            .iter()
            .filter(|(c, _)| c == "code-value-quantity")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            pairs,
            vec![&IndexValue::CodeValue {
                system: "urn:x".into(),
                code: "c".into(),
                value: 5.0
            }]
        );
        // Only over a quantity with one value per resource (a row per code and resource).
        let model = reg.model();
        for (path, one) in [
            ("Observation.value.as(Quantity)", true),
            ("Observation.value", true),
            ("Observation.code", true),
            ("Observation.category", false),
            ("Observation.component.value.as(Quantity)", false),
            ("Observation.value.as(Quantity).value", false),
            ("Patient.value", false),
        ] {
            assert_eq!(super::one_value("Observation", path, model), one, "{path}");
        }
        let concept =
            rows(serde_json::json!({"valueCodeableConcept": {"coding": [{"code": "p"}]}}));
        assert!(!concept.iter().any(|(c, _)| c == "code-value-quantity"));
        assert!(!quantity.iter().any(|(c, _)| c.contains('#')));
        let string = rows(serde_json::json!({"valueString": "high"}));
        assert!(string.contains(&(
            "code-value-string#1".to_string(),
            IndexValue::String("high".into(), "high".into())
        )));
    }

    #[test]
    fn names_and_addresses_read_their_parts_rows() {
        use super::IndexValue;
        let reg = kizuna_fhir::Registry::builtin();
        let idx = Indexer::new(reg);
        let keys = |rt: &str, code: &str| {
            idx.param(rt, code)
                .map(|p| {
                    p.part_params
                        .iter()
                        .map(|x| format!("{}={}", x.key, x.code))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            keys("Patient", "name"),
            vec!["family=family", "given=given"]
        );
        let address_parts = vec![
            "city=address-city",
            "state=address-state",
            "postalCode=address-postalcode",
            "country=address-country",
        ];
        assert_eq!(keys("Patient", "address"), address_parts);
        assert_eq!(
            keys("Practitioner", "name"),
            vec!["family=family", "given=given"]
        );
        assert_eq!(keys("Organization", "address"), address_parts);
        // Parts themselves, and strings over other elements, keep all their rows.
        for (rt, code) in [
            ("Patient", "family"),
            ("Patient", "phonetic"),
            ("Organization", "name"),
        ] {
            assert!(keys(rt, code).is_empty(), "{rt}.{code}");
        }
        let rows = idx.extract(
            reg,
            &serde_json::json!({"resourceType": "Patient",
                "name": [{"text": "山田 太郎", "family": "山田", "given": ["太郎"], "prefix": ["Dr"]}],
                "address": [{"line": ["1-2-3"], "city": "千葉市", "country": "JP"}]}),
        );
        let of = |code: &str| {
            let mut v: Vec<String> = rows
                .iter()
                .filter(|(c, _)| c == code)
                .filter_map(|(_, v)| match v {
                    IndexValue::String(_, exact) => Some(exact.clone()),
                    _ => None,
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(of("name"), vec!["Dr", "山田 太郎"]);
        assert_eq!(of("family"), vec!["山田"]);
        assert_eq!(of("given"), vec!["太郎"]);
        assert_eq!(of("address"), vec!["1-2-3"]);
        assert_eq!(of("address-city"), vec!["千葉市"]);
        assert_eq!(of("address-country"), vec!["JP"]);
    }

    #[test]
    fn narrower_parameters_keep_the_rows_they_share() {
        use super::IndexValue;
        let reg = kizuna_fhir::Registry::builtin();
        let idx = Indexer::new(reg);
        let narrowings = |rt: &str, code: &str| {
            let mut v = idx
                .param(rt, code)
                .map(|p| p.narrowings.clone())
                .unwrap_or_default();
            v.sort();
            v
        };
        assert_eq!(narrowings("Observation", "subject"), vec!["patient"]);
        assert_eq!(narrowings("Condition", "subject"), vec!["patient"]);
        assert_eq!(narrowings("Patient", "telecom"), vec!["email", "phone"]);
        // Not narrowings: another path (`AllergyIntolerance.patient`), the narrow ones themselves,
        // and parameters defined alike (DeviceUseStatement's `patient` reads `subject`'s rows).
        for (rt, code) in [
            ("AllergyIntolerance", "patient"),
            ("Observation", "patient"),
            ("Patient", "phone"),
            ("DeviceUseStatement", "patient"),
            ("DeviceUseStatement", "subject"),
        ] {
            assert!(narrowings(rt, code).is_empty(), "{rt}.{code}");
        }
        let rows = idx.extract(
            reg,
            &serde_json::json!({"resourceType": "Patient",
                "telecom": [{"system": "phone", "value": "03-1234"}, {"system": "email", "value": "a@b.jp"},
                            {"system": "fax", "value": "03-9999"}, {"system": "phone", "value": "03-9999"}]}),
        );
        let of = |code: &str| {
            let mut v: Vec<String> = rows
                .iter()
                .filter(|(c, _)| c == code)
                .filter_map(|(_, v)| match v {
                    IndexValue::Token(_, c) => Some(c.clone()),
                    _ => None,
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(of("phone"), vec!["03-1234", "03-9999"]);
        assert_eq!(of("email"), vec!["a@b.jp"]);
        // `telecom` keeps only the fax (its rows name the system: the same number as a phone
        // is another row).
        assert_eq!(of("telecom"), vec!["03-9999"]);
        let obs = |subject: &str| {
            idx.extract(
                reg,
                &serde_json::json!({"resourceType": "Observation", "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": subject, "identifier": {"system": "urn:s", "value": "1"}}}),
            )
        };
        let codes = |rows: Vec<(String, IndexValue)>| {
            let mut v: Vec<String> = rows
                .into_iter()
                .map(|(c, _)| c)
                .filter(|c| c.starts_with("subject") || c.starts_with("patient"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            codes(obs("Patient/p1")),
            vec!["patient", "patient:identifier"]
        );
        assert_eq!(
            codes(obs("Group/g1")),
            vec!["subject", "subject:identifier"]
        );
    }

    #[test]
    fn references_to_contained_resources_are_listed_not_indexed() {
        let reg = kizuna_fhir::Registry::builtin();
        let idx = Indexer::new(reg);
        let obs = serde_json::json!({"resourceType": "Observation", "status": "final",
            "contained": [{"resourceType": "Encounter", "id": "e1", "status": "finished"},
                          {"resourceType": "Specimen", "id": "s1"},
                          {"resourceType": "Practitioner", "id": "p1"},
                          {"resourceType": "Practitioner", "id": "p2"}],
            "code": {"text": "x"},
            "subject": {"reference": "Patient/123"},
            "encounter": {"reference": "#e1"},
            "specimen": {"reference": "#s1"},
            "performer": [{"reference": "#p1"}, {"reference": "#p2"},
                          {"reference": "Organization/o1"}]});
        let rows = idx.extract(reg, &obs);
        assert!(
            !rows.iter().any(|(_, v)| v.is_contained_reference()),
            "{rows:?}"
        );
        let listed: Vec<_> = rows
            .iter()
            .filter(|(c, _)| c == super::CONTAINED_REFERENCES)
            .collect();
        assert_eq!(listed.len(), 1, "{rows:?}");
        let super::IndexValue::Reference(t, codes) = &listed[0].1 else {
            panic!("{listed:?}");
        };
        assert_eq!(t, "");
        let mut got: Vec<&str> = codes.split(',').filter(|c| !c.is_empty()).collect();
        got.sort_unstable();
        assert_eq!(got, ["encounter", "performer", "specimen"]);
        // Real references keep their rows, beside a contained one of the same parameter (the
        // Patient subject's under `patient`, which narrows `subject`).
        for (code, ty) in [("patient", "Patient"), ("performer", "Organization")] {
            assert!(
                rows.iter().any(|(c, v)| c == code
                    && matches!(v, super::IndexValue::Reference(t, _) if t == ty)),
                "{code}: {rows:?}"
            );
        }
        // A resource without contained references has no listing row.
        let plain = serde_json::json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "Patient/123"}});
        assert!(!idx
            .extract(reg, &plain)
            .iter()
            .any(|(c, _)| c == super::CONTAINED_REFERENCES));
    }

    #[test]
    fn resource_typed_paths_are_found_from_the_model() {
        let model = kizuna_fhir::Registry::builtin().model();
        let ends = |parts: &[&str]| {
            let parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
            super::paths_end_at_resources("Bundle", &parts, model)
        };
        assert!(ends(&["Bundle.entry[0].resource"]));
        assert!(ends(&["Bundle.entry.first().resource"]));
        assert!(ends(&["Bundle.entry.resource"]));
        assert!(!ends(&["Bundle.entry[0]"]));
        assert!(!ends(&["Bundle.identifier"]));
        assert!(!ends(&["Bundle.entry[0].resource", "Bundle.identifier"]));
        assert!(!ends(&["Observation.subject"]));
        assert!(!ends(&[]));
    }

    #[test]
    fn a_bundles_first_resource_is_indexed_under_its_embedding_parameter() {
        use super::IndexValue::{Reference, Token};
        let reg = kizuna_fhir::Registry::builtin();
        let idx = Indexer::new(reg);
        // Found from the type model, not from a list: R4's two, on Bundle only.
        let mut embedding: Vec<&str> = reg
            .model()
            .resource_types()
            .into_iter()
            .flat_map(|t| {
                idx.params(t)
                    .filter(|p| p.embeds)
                    .map(move |p| (t, p.code.as_str()))
            })
            .map(|(t, c)| if t == "Bundle" { c } else { "elsewhere" })
            .collect();
        embedding.sort_unstable();
        assert_eq!(embedding, ["composition", "message"]);
        assert_eq!(idx.embedding_types(), ["Bundle"]);
        let sub = idx.param("Bundle", "composition.subject");
        assert!(sub.is_some_and(|p| p.narrowings == ["composition.patient"]));
        assert!(idx.param("Bundle", "composition.event").is_none());
        assert!(idx.param("Bundle", "message.event").is_some());
        let doc = serde_json::json!({"resourceType": "Bundle", "type": "document",
            "entry": [{"resource": {"resourceType": "Composition", "id": "c1", "status": "final",
                "type": {"coding": [{"system": "http://loinc.org", "code": "57133-1"}]},
                "subject": {"reference": "Patient/p1"}, "date": "2026-11-01",
                "contained": [{"resourceType": "Encounter", "id": "e", "status": "finished"}],
                "encounter": {"reference": "#e"}, "title": "診療情報提供書"}},
                {"resource": {"resourceType": "Patient", "id": "p1", "gender": "male"}}]});
        let rows = idx.extract(reg, &doc);
        let has = |code: &str, v: &super::IndexValue| rows.iter().any(|(c, x)| c == code && x == v);
        let tok = |s: &str, c: &str| Token(s.into(), c.into());
        assert!(
            has("composition.type", &tok("http://loinc.org", "57133-1")),
            "{rows:?}"
        );
        assert!(has("composition.status", &tok("", "final")), "{rows:?}");
        assert!(has("composition._id", &tok("", "c1")), "{rows:?}");
        assert!(
            has(
                "composition.patient",
                &Reference("Patient".into(), "p1".into())
            ),
            "{rows:?}"
        );
        // Narrowed as a stored Composition's rows are: the Patient subject is `patient`'s row.
        assert!(
            !rows.iter().any(|(c, _)| c == "composition.subject"),
            "{rows:?}"
        );
        assert!(
            has(
                "composition.#contained",
                &Reference(String::new(), ",composition.encounter,".into())
            ),
            "{rows:?}"
        );
        assert!(rows.iter().any(|(c, _)| c == "composition.date"));
        assert!(rows.iter().any(|(c, _)| c == "composition.title"));
        // The embedding parameter names the resource; nothing from the second entry, nor
        // under `message`.
        let named: Vec<_> = rows.iter().filter(|(c, _)| c == "composition").collect();
        assert_eq!(named.len(), 1, "{rows:?}");
        assert_eq!(named[0].1, Reference("Composition".into(), "c1".into()));
        for (c, _) in &rows {
            assert!(!c.starts_with("message") && !c.starts_with("gender"), "{c}");
        }
        // A message's header is a MessageHeader, not a Composition.
        let msg = serde_json::json!({"resourceType": "Bundle", "type": "message",
            "entry": [{"resource": {"resourceType": "MessageHeader",
                "eventCoding": {"system": "urn:x", "code": "notify"},
                "source": {"endpoint": "urn:y"}}}]});
        let rows = idx.extract(reg, &msg);
        assert!(rows
            .iter()
            .any(|(c, v)| c == "message.event" && *v == tok("urn:x", "notify")));
        assert!(
            !rows.iter().any(|(c, _)| c.starts_with("composition")),
            "{rows:?}"
        );
        // A Composition inside a Composition's Bundle inside … is not followed further.
        let nested = serde_json::json!({"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": {"resourceType": "Bundle", "type": "document",
                "entry": [{"resource": {"resourceType": "Composition", "status": "final"}}]}}]});
        assert!(!idx
            .extract(reg, &nested)
            .iter()
            .any(|(c, _)| c.contains('.')));
    }
}

#[cfg(test)]
mod start_key_tests {
    use super::Indexer;
    use kizuna_fhir::fhirpath::EvalContext;
    use kizuna_fhir::Registry;
    use serde_json::Value;

    /// Every resource of the bundled examples, with each top-level element removed in turn.
    fn cases(reg: &Registry) -> Vec<Value> {
        let mut resources = Vec::new();
        for ex in reg.examples() {
            let ex = ex.as_ref();
            for e in ex["entry"].as_array().into_iter().flatten() {
                resources.push(e["resource"].clone());
            }
            resources.push(ex.clone());
        }
        let mut out = Vec::new();
        for r in resources {
            if let Value::Object(m) = &r {
                for k in m.keys().filter(|k| *k != "resourceType") {
                    let mut less = m.clone();
                    less.remove(k);
                    out.push(Value::Object(less));
                }
            }
            out.push(r);
        }
        out
    }

    /// A parameter skipped for a resource would have given nothing: its expression evaluates to
    /// nothing (or fails, which extraction skips too) on every case.
    #[test]
    fn skipped_parameters_would_have_found_nothing() {
        let reg = Registry::builtin();
        let idx = Indexer::new(reg);
        let (mut evaluated, mut skipped) = (0usize, 0usize);
        for r in cases(reg) {
            let rt = r["resourceType"].as_str().unwrap_or("");
            let ctx = EvalContext::new(reg.model()).with_resource(&r);
            for p in idx.params(rt) {
                evaluated += 1;
                if p.may_match(&r) {
                    continue;
                }
                skipped += 1;
                let found = p.expr.evaluate_resource(&ctx, &r).unwrap_or_default();
                assert!(
                    found.is_empty(),
                    "{rt}.{} ({}) was skipped but finds {} items",
                    p.code,
                    p.expr.source(),
                    found.len()
                );
            }
        }
        // Not vacuous: many parameters find nothing in a given resource, and are skipped.
        assert!(evaluated > 10_000, "{evaluated} evaluations");
        assert!(skipped * 3 > evaluated, "{skipped} of {evaluated} skipped");
    }

    /// Plain paths get start keys; expressions that can give something from nothing do not.
    #[test]
    fn start_keys_follow_the_expression() {
        let idx = Indexer::new(Registry::builtin());
        let starts = |rt: &str, code: &str| {
            idx.param(rt, code)
                .and_then(|p| p.starts.as_ref())
                .map(|v| {
                    v.iter()
                        .map(|k| (k.name.clone(), k.choice))
                        .collect::<Vec<_>>()
                })
        };
        assert_eq!(
            starts("Observation", "code"),
            Some(vec![("code".into(), false)])
        );
        assert_eq!(
            starts("Observation", "value-quantity"),
            Some(vec![("value".into(), true)])
        );
        assert_eq!(
            starts("Patient", "_tag"),
            Some(vec![("meta".into(), false)])
        );
        // `Patient.deceased.exists() and Patient.deceased != false`
        assert_eq!(starts("Patient", "deceased"), None);
        // Composites start from the resource itself.
        assert_eq!(starts("Observation", "code-value-quantity"), None);
    }
}

#[cfg(test)]
mod cast_tests {
    use super::{IndexValue, Indexer};
    use serde_json::json;

    #[test]
    fn casts_of_repeating_elements_index_every_value() {
        let reg = kizuna_fhir::Registry::builtin();
        let idx = Indexer::new(reg);
        let types = idx.repeating_cast_types(reg.model());
        // `Goal.target.due as date`; JP Core's `jp-kana-sort` casts inside `extension(…)`,
        // which may repeat.
        for t in [
            "Observation",
            "Group",
            "ActivityDefinition",
            "Goal",
            "Patient",
        ] {
            assert!(types.iter().any(|x| x == t), "{t} in {types:?}");
        }
        // Casts of single elements read the same either way: no reindex for these.
        for t in ["Condition", "Encounter", "Procedure"] {
            assert!(!types.iter().any(|x| x == t), "{t} in {types:?}");
        }
        let bp = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "血圧"},
            "component": [
                {"code": {"text": "収縮期"}, "valueQuantity": {"value": 120}},
                {"code": {"text": "拡張期"}, "valueQuantity": {"value": 80}},
                {"code": {"text": "体位"}, "valueCodeableConcept": {"coding": [{"code": "sit"}]}}]});
        let rows = idx.extract(reg, &bp);
        let quantities = rows
            .iter()
            .filter(|(c, v)| {
                c == "component-value-quantity" && matches!(v, IndexValue::Quantity { .. })
            })
            .count();
        assert_eq!(quantities, 2, "{rows:?}");
        assert!(rows.iter().any(|(c, _)| c == "component-value-concept"));
    }
}

#[cfg(test)]
mod evaluation_tests {
    use super::Indexer;
    use kizuna_fhir::fhirpath::EvalContext;
    use serde_json::Value;

    /// The vendored JP-CLINS examples (bundles and their entries) and generated submissions.
    fn resources() -> Vec<Value> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kizuna-fhir/data/examples");
        let mut stack = vec![std::path::PathBuf::from(dir)];
        let mut out = Vec::new();
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "json") {
                    let v: Value = std::fs::read(&p)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_else(|| panic!("{}", p.display()));
                    out.extend(
                        v["entry"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|e| e["resource"].clone()),
                    );
                    out.push(v);
                }
            }
        }
        let inst = kizuna_synth::population::institutions(11);
        for i in 0..100 {
            for (_, b) in kizuna_synth::sample_submissions(11, i, 2, &inst) {
                out.extend(
                    b["entry"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| e["resource"].clone()),
                );
            }
        }
        out
    }

    /// A parameter whose expression fails on a resource gives it no rows, silently: none may
    /// fail on the resources this service receives.
    #[test]
    fn no_parameter_fails_on_the_examples_or_generated_data() {
        let reg = kizuna_fhir::Registry::builtin();
        let idx = Indexer::new(reg);
        let all = resources();
        assert!(all.len() > 5_000, "{} resources", all.len());
        let mut failures = Vec::new();
        let mut evaluated = 0;
        for r in &all {
            let rt = r["resourceType"].as_str().unwrap_or("");
            let ctx = EvalContext::new(reg.model()).with_resource(r);
            for p in idx.params(rt) {
                evaluated += 1;
                match p.expr.evaluate_resource(&ctx, r) {
                    Err(e) => failures.push(format!("{rt}.{}: {e}", p.code)),
                    Ok(items) => {
                        for c in &p.components {
                            for it in &items {
                                if let Err(e) = c.expr.evaluate(&ctx, vec![it.clone()]) {
                                    failures.push(format!("{rt}.{} component: {e}", p.code));
                                }
                            }
                        }
                    }
                }
            }
        }
        failures.sort();
        failures.dedup();
        assert!(evaluated > 100_000, "{evaluated} evaluations");
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
