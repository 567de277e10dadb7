//! Search over the index tables, per the FHIR R4 search specification.
//!
//! A query is compiled, parameter by parameter, into sets of resource ids selected from the index
//! tables (AND across parameters, OR across comma-separated values). Chained parameters
//! (`subject:Patient.name=…`, several levels) and reverse chains (`_has:Observation:patient:code=…`,
//! nested) become nested id sets over the reference index, so one SQL statement answers the whole
//! query on SQLite and PostgreSQL alike. One set drives the statement (`r.rid IN (…)`); the others
//! are probed per candidate (`EXISTS`). On both backends, a page in the default order first counts
//! each set up to [`COUNT_CAP`] + 1 and picks a plan: collect a small set, read along index rows
//! that come in row-id order, or walk the type's rows in row-id order probing each criterion —
//! the last two stop at the page's end.

use kizuna_fhir::fhirpath::DateTime;
use serde_json::Value;
use sqlx::Row;

use crate::index::{
    date_range, normalise, reference_key, ParamType, CONTAINED_REFERENCES, IDENTIFIER_SUFFIX,
    OF_TYPE_SUFFIX, TEXT_SUFFIX,
};
use crate::{Backend, Store, StoreError, Stored};

/// One `name[:modifier]=value` of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParamValue {
    /// Parameter code (for chains and `_has`, the part before the first colon).
    pub name: String,
    /// What followed the first colon: a modifier (`exact`, `not`, `missing` …), a chain's type
    /// restriction, or the rest of a `_has` key.
    pub modifier: Option<String>,
    /// The raw value (may hold commas for OR).
    pub value: String,
}

impl SearchParamValue {
    /// The key as written in the query (`name[:modifier]`).
    pub fn key(&self) -> String {
        match &self.modifier {
            Some(m) => format!("{}:{m}", self.name),
            None => self.name.clone(),
        }
    }
}

/// One `_sort` key: `_id`, `_lastUpdated` or a search parameter of the type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortSpec {
    /// The parameter.
    pub param: String,
    /// `-param`: descending.
    pub descending: bool,
}

/// `_total`: whether the searchset carries a count of all matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Total {
    /// Without `_total`: counted up to [`COUNT_CAP`] matches, given when exact and left out beyond
    /// (the spec makes `total` optional). A patient's records are counted; a population query on a
    /// large store does not pay for counting thousands of rows it will not return. On SQLite, a
    /// query whose every criterion matches more than the cap on its own is not counted either.
    Bounded,
    /// Counted exactly (`_total=accurate`, and `_total=estimate`, which kizuna answers exactly).
    Accurate,
    /// Not counted (`_total=none`): one query less for clients that only page.
    None,
}

/// How many matches a search without `_total` counts before it stops and leaves `total` out.
pub const COUNT_CAP: i64 = 1000;

/// A search request.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    /// Parameters (AND).
    pub params: Vec<SearchParamValue>,
    /// Page size.
    pub count: i64,
    /// Offset of the page.
    pub offset: i64,
    /// Sort keys, most significant first; empty sorts by `_lastUpdated`.
    pub sort: Vec<SortSpec>,
    /// Unknown parameters are errors (`Prefer: handling=strict`) rather than ignored.
    pub strict: bool,
    /// `_include` values.
    pub includes: Vec<crate::Include>,
    /// `_revinclude` values.
    pub revincludes: Vec<crate::Include>,
    /// Control parameters whose value could not be read (reported by [`Store::search`]).
    pub malformed: Vec<String>,
    /// `_total`.
    pub total: Total,
    /// The instant `ap` on dates measures from (epoch ms); `None` reads the clock.
    pub now_ms: Option<i64>,
    /// Parse only these top-level elements of each match and hand back the stored text whole
    /// ([`Stored::text`]): for callers that look at a few elements (access policy, audit) and
    /// write the rest out untouched. `None` parses everything.
    pub outline: Option<&'static [&'static str]>,
}

impl Default for SearchQuery {
    fn default() -> Self {
        SearchQuery {
            params: Vec::new(),
            count: 50,
            offset: 0,
            sort: Vec::new(),
            strict: true,
            includes: Vec::new(),
            revincludes: Vec::new(),
            malformed: Vec::new(),
            total: Total::Bounded,
            now_ms: None,
            outline: None,
        }
    }
}

/// Result-shaping parameters the server applies (`_summary`, `_elements`, `_format`, `_pretty`):
/// not search criteria, so the store passes over them.
const VIEW_PARAMS: &[&str] = &["_summary", "_elements", "_format", "_pretty"];

impl SearchQuery {
    /// Parses `a=b&c:exact=d` pairs (already percent-decoded).
    pub fn from_pairs(pairs: &[(String, String)]) -> SearchQuery {
        let mut q = SearchQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "_count" => match v.parse::<i64>() {
                    Ok(n) if n >= 0 => q.count = n,
                    _ => q.malformed.push(k.clone()),
                },
                "_offset" => match v.parse::<i64>() {
                    Ok(n) if n >= 0 => q.offset = n,
                    _ => q.malformed.push(k.clone()),
                },
                "_sort" => {
                    for part in v.split(',').filter(|s| !s.is_empty()) {
                        let (param, descending) = match part.strip_prefix('-') {
                            Some(p) => (p, true),
                            None => (part, false),
                        };
                        q.sort.push(SortSpec {
                            param: param.to_string(),
                            descending,
                        });
                    }
                }
                "_total" => match v.as_str() {
                    "none" => q.total = Total::None,
                    "accurate" | "estimate" => q.total = Total::Accurate,
                    _ => q.malformed.push(k.clone()),
                },
                "_include" | "_include:iterate" | "_revinclude" | "_revinclude:iterate" => {
                    let iterate = k.ends_with(":iterate");
                    let target = if k.starts_with("_include") {
                        &mut q.includes
                    } else {
                        &mut q.revincludes
                    };
                    match crate::Include::parse(v, iterate) {
                        Some(i) => target.push(i),
                        None => q.malformed.push(k.clone()),
                    }
                }
                k if VIEW_PARAMS.contains(&k) => {}
                _ => {
                    let (name, modifier) = match k.split_once(':') {
                        Some((n, m)) => (n.to_string(), Some(m.to_string())),
                        None => (k.clone(), None),
                    };
                    q.params.push(SearchParamValue {
                        name,
                        modifier,
                        value: v.clone(),
                    });
                }
            }
        }
        q
    }
}

/// A page of results.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// Matches in total (`None` with `_total=none`).
    pub total: Option<i64>,
    /// This page.
    pub resources: Vec<Stored>,
    /// Parameters that were ignored (lenient handling).
    pub ignored: Vec<String>,
    /// Resources brought in by `_include`/`_revinclude` (search mode `include`).
    pub included: Vec<Stored>,
    /// True while a background reindex after an upgrade may leave matches out of this search
    /// ([`Store::reindexing`]): the answer is right for what is indexed so far.
    pub reindexing: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum B {
    S(String),
    I(i64),
    F(f64),
}

/// Splits on `sep` where it is not escaped with a backslash; escapes stay for the next level.
fn split_unescaped(v: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut esc = false;
    for c in v.chars() {
        if esc {
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            cur.push(c);
            esc = true;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Removes FHIR search escapes (`\,` `\$` `\|` `\\`).
fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut esc = false;
    for c in v.chars() {
        if esc {
            out.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else {
            out.push(c);
        }
    }
    out
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Splits a comparison prefix (`ge2020`, `lt5.4`) from a date, number or quantity value.
fn prefix(v: &str) -> (&str, &str) {
    for p in ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"] {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') {
                return (p, rest);
            }
        }
    }
    ("eq", v)
}

/// `IN (?, …)` over parameter ids, with their binds; `IN (?)` bound to -1 (no parameter has it)
/// when there are none.
fn pid_list(ids: Vec<i64>) -> (String, Vec<B>) {
    let marks = vec!["?"; ids.len().max(1)].join(", ");
    let binds = if ids.is_empty() {
        vec![B::I(-1)]
    } else {
        ids.into_iter().map(B::I).collect()
    };
    (format!("IN ({marks})"), binds)
}

fn bad(p: &str, v: &str) -> StoreError {
    StoreError::BadSearchValue {
        param: p.to_string(),
        value: v.to_string(),
    }
}

/// Column names of one index row as the value conditions see them: two or three texts and two
/// numbers, so one condition builder serves a main index table and a composite's component.
#[derive(Debug, Clone, Copy)]
struct Cols {
    s1: &'static str,
    s2: &'static str,
    s3: &'static str,
    n1: &'static str,
    n2: &'static str,
}

const fn cols(
    s1: &'static str,
    s2: &'static str,
    s3: &'static str,
    n1: &'static str,
    n2: &'static str,
) -> Cols {
    Cols { s1, s2, s3, n1, n2 }
}

/// The index table and columns of a parameter type.
fn table_of(kind: ParamType) -> (&'static str, Cols) {
    match kind {
        ParamType::Token => ("idx_token", cols("system", "code", "", "", "")),
        ParamType::String => ("idx_string", cols("norm", "exact", "", "", "")),
        ParamType::Date => ("idx_date", cols("", "", "", "lo", "hi")),
        ParamType::Reference => ("idx_reference", cols("ttype", "tid", "", "", "")),
        ParamType::Number => ("idx_number", cols("", "", "", "val", "")),
        ParamType::Quantity => ("idx_quantity", cols("system", "code", "unit", "val", "")),
        ParamType::Uri => ("idx_uri", cols("", "val", "", "", "")),
        ParamType::Composite => ("idx_composite", cols("", "", "", "", "")),
    }
}

/// The composite component columns (the mapping `component_columns` in the store writes).
const COMPONENT_COLS: [Cols; crate::COMPOSITE_PARTS] = [
    cols("c0_s1", "c0_s2", "c0_s3", "c0_n1", "c0_n2"),
    cols("c1_s1", "c1_s2", "c1_s3", "c1_n1", "c1_n2"),
    cols("c2_s1", "c2_s2", "c2_s3", "c2_n1", "c2_n2"),
];

/// How deep chains and `_has` may nest.
const MAX_DEPTH: usize = 4;

/// What a set of resources is given as: row ids (`rid`, from index rows) or logical ids (`id`, the
/// targets of references, from `_has`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdKind {
    Rid,
    Logical,
}

impl IdKind {
    /// The column of `resources` this kind compares with.
    fn column(self) -> &'static str {
        match self {
            IdKind::Rid => "rid",
            IdKind::Logical => "id",
        }
    }
}

/// A criterion and how selective its kind is likely to be (lower drives the query).
type Ranked = (Crit, u8);

/// One compiled criterion.
enum Crit {
    /// A condition on the outer resources row, written with `@R` for its alias (`_id`, `_lastUpdated`).
    Direct(String, Vec<B>),
    /// A set of resources: `SELECT {idcol} FROM {from_where}`, or its complement when `negate`.
    /// `ordered`: `from_where` reads one index row per resource, in row-id order.
    Set {
        from_where: String,
        idcol: String,
        kind: IdKind,
        binds: Vec<B>,
        negate: bool,
        ordered: bool,
    },
}

/// Compiles criteria; holds the alias counter and the parameters lenient handling skipped.
struct Compiler<'s> {
    store: &'s Store,
    strict: bool,
    aliases: usize,
    ignored: Vec<String>,
    now_ms: i64,
    /// ` COLLATE "C"` on PostgreSQL, so text ranges compare bytes as SQLite's BINARY does.
    bytewise: &'static str,
}

impl Compiler<'_> {
    fn alias(&mut self) -> String {
        self.aliases += 1;
        format!("x{}", self.aliases)
    }

    fn unknown(&mut self, key: &str) -> Result<Option<Ranked>, StoreError> {
        if self.strict {
            Err(StoreError::UnknownParameter(key.to_string()))
        } else {
            self.ignored.push(key.to_string());
            Ok(None)
        }
    }

    /// A criterion as a plain set (`SELECT … `) of resources of `rt`, for use inside chains and `_has`.
    fn positive(&mut self, rt: &str, c: Crit) -> (String, Vec<B>, IdKind) {
        match c {
            Crit::Set {
                from_where,
                idcol,
                kind,
                binds,
                negate: false,
                ..
            } => (format!("SELECT {idcol} FROM {from_where}"), binds, kind),
            Crit::Set {
                from_where,
                idcol,
                kind,
                binds,
                negate: true,
                ..
            } => {
                let a = self.alias();
                let mut b = vec![B::S(rt.to_string())];
                b.extend(binds);
                (
                    format!(
                        "SELECT {a}.rid FROM resources {a} WHERE {a}.rtype = ? AND {a}.deleted = 0 AND {a}.{} NOT IN (SELECT {idcol} FROM {from_where})",
                        kind.column()
                    ),
                    b,
                    IdKind::Rid,
                )
            }
            Crit::Direct(cond, binds) => {
                let a = self.alias();
                let mut b = vec![B::S(rt.to_string())];
                b.extend(binds);
                (
                    format!(
                        "SELECT {a}.rid FROM resources {a} WHERE {a}.rtype = ? AND {a}.deleted = 0 AND ({})",
                        cond.replace("@R", &a)
                    ),
                    b,
                    IdKind::Rid,
                )
            }
        }
    }

    /// A set of resources of `rt` given as `want`, converting through `resources` when needed.
    fn as_kind(
        &mut self,
        rt: &str,
        (sql, binds, kind): (String, Vec<B>, IdKind),
        want: IdKind,
    ) -> (String, Vec<B>) {
        if kind == want {
            return (sql, binds);
        }
        let a = self.alias();
        match kind {
            // Row ids are of this type already; testing the type would lead SQLite to scan the
            // type's rows instead of looking the ids up.
            IdKind::Rid => (
                format!("SELECT {a}.id FROM resources {a} WHERE {a}.rid IN ({sql})"),
                binds,
            ),
            IdKind::Logical => {
                let mut b = vec![B::S(rt.to_string())];
                b.extend(binds);
                (
                    format!(
                        "SELECT {a}.rid FROM resources {a} WHERE {a}.rtype = ? AND {a}.id IN ({sql})"
                    ),
                    b,
                )
            }
        }
    }

    /// `IN (?, …)` over the ids of a parameter (of its members, for a union parameter) and the
    /// binds; a parameter never indexed gets an id no row has.
    fn pids(&self, rt: &str, code: &str, suffix: &str) -> (String, Vec<B>) {
        pid_list(self.store.pids(rt, code, suffix))
    }

    /// Compiles `key=value` on resources of type `rt`; `None` when lenient handling skipped it.
    /// The second value ranks how selective the criterion is likely to be (lower drives the query).
    fn compile(
        &mut self,
        rt: &str,
        key: &str,
        value: &str,
        depth: usize,
    ) -> Result<Option<Ranked>, StoreError> {
        if depth > MAX_DEPTH {
            return Err(bad(key, "chains and _has nest at most 4 levels"));
        }
        if let Some(rest) = key.strip_prefix("_has:") {
            return self.compile_has(rt, key, rest, value, depth);
        }
        if let Some(dot) = key.find('.') {
            return self.compile_chain(rt, key, &key[..dot], &key[dot + 1..], value, depth);
        }
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key, None),
        };
        if name == "_id" || name == "_lastUpdated" {
            if modifier.is_some() {
                return Err(bad(
                    key,
                    "modifiers are not supported on _id and _lastUpdated",
                ));
            }
            let mut ors = Vec::new();
            let mut binds = Vec::new();
            for v in split_unescaped(value, ',') {
                if name == "_id" {
                    ors.push("@R.id = ?".to_string());
                    binds.push(B::S(unescape(&v)));
                } else {
                    ors.push(self.date_cond("@R.lu_ms", "@R.lu_ms", key, &v, &mut binds)?);
                }
            }
            let rank = if name == "_id" { 0 } else { 6 };
            return Ok(Some((
                Crit::Direct(format!("({})", ors.join(" OR ")), binds),
                rank,
            )));
        }
        self.compile_param(rt, key, name, modifier, value)
    }

    /// Compiles `name[:modifier]=value`, one parameter of `rt` (`key` as written, for errors).
    fn compile_param(
        &mut self,
        rt: &str,
        key: &str,
        name: &str,
        modifier: Option<&str>,
        value: &str,
    ) -> Result<Option<Ranked>, StoreError> {
        let Some(sp) = self.store.indexer().param(rt, name) else {
            return self.unknown(key);
        };
        let kind = sp.kind;
        let a = self.alias();
        let (mut table, mut c) = table_of(kind);
        let mut suffix = "";
        let mut negate = false;
        let mut value_kind = kind;
        let mut ref_type: Option<&str> = None;
        let mut string_mode = modifier;
        match (kind, modifier) {
            (ParamType::Composite, None | Some("missing")) => {
                return self.composite_crit(rt, name, key, value, modifier.is_some())
            }
            (_, Some("missing")) => {
                let missing = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad(key, ":missing takes true or false")),
                };
                let (pids, mut binds) = self.pids(rt, name, suffix);
                let mut cond = format!("{a}.pid {pids}");
                if kind == ParamType::Reference {
                    // References to contained resources have no rows of their own; the
                    // resource's one `#contained` row lists the parameters that had them (an
                    // embedded resource's row is `{embedding}.#contained`).
                    let listing = match name.rsplit_once('.') {
                        Some((embedding, _)) => format!("{embedding}.{CONTAINED_REFERENCES}"),
                        None => CONTAINED_REFERENCES.to_string(),
                    };
                    let (listed, b) = self.pids(rt, &listing, "");
                    binds.extend(b);
                    let find = match self.store.backend() {
                        Backend::Sqlite => format!("instr({a}.tid, ?) > 0"),
                        Backend::Postgres => format!("strpos({a}.tid, ?) > 0"),
                    };
                    let codes = self.store.member_codes(rt, name);
                    let any = vec![find.as_str(); codes.len()].join(" OR ");
                    binds.extend(codes.iter().map(|c| B::S(format!(",{c},"))));
                    cond = format!("({cond} OR ({a}.pid {listed} AND ({any})))");
                }
                return Ok(Some((
                    Crit::Set {
                        from_where: format!("{table} {a} WHERE {cond}"),
                        idcol: format!("{a}.rid"),
                        kind: IdKind::Rid,
                        binds,
                        negate: missing,
                        ordered: false,
                    },
                    5,
                )));
            }
            (ParamType::Token, Some("not")) => negate = true,
            (ParamType::Token, Some("text")) => {
                (table, c) = table_of(ParamType::String);
                suffix = TEXT_SUFFIX;
                value_kind = ParamType::String;
                string_mode = None;
            }
            (ParamType::Token, Some("of-type")) => suffix = OF_TYPE_SUFFIX,
            (ParamType::Reference, Some("identifier")) => {
                (table, c) = table_of(ParamType::Token);
                suffix = IDENTIFIER_SUFFIX;
                value_kind = ParamType::Token;
            }
            (ParamType::Reference, Some(t)) if self.store.registry().model().is_resource(t) => {
                ref_type = Some(t)
            }
            (ParamType::String, Some("exact" | "contains")) => {}
            (ParamType::Uri, Some("below" | "above")) => {}
            (_, None) => {}
            (_, Some(m)) => {
                return Err(bad(
                    key,
                    &format!(":{m} is not supported on {} parameters", kind.name()),
                ))
            }
        }
        let mut ors = Vec::new();
        let (pids, mut binds) = self.pids(rt, name, suffix);
        for v in split_unescaped(value, ',') {
            let cond = if modifier == Some("of-type") {
                let parts = split_unescaped(&v, '|');
                let [sys, code, val] = parts.as_slice() else {
                    return Err(bad(key, ":of-type takes system|code|value"));
                };
                binds.push(B::S(format!("{}|{}", unescape(sys), unescape(code))));
                binds.push(B::S(unescape(val)));
                format!("({a}.system = ? AND {a}.code = ?)")
            } else {
                self.value_cond(
                    &a,
                    c,
                    value_kind,
                    string_mode,
                    ref_type,
                    key,
                    &v,
                    &mut binds,
                )?
            };
            ors.push(cond);
        }
        // One parameter id and one `(s1 = ? AND s2 = ?)` on the token or reference table bind the
        // whole key before `rid`: the rows come one per resource, in row-id order.
        let ordered = !negate
            && binds.len() == 3
            && ors.len() == 1
            && matches!(table, "idx_token" | "idx_reference")
            && ors[0] == format!("({a}.{} = ? AND {a}.{} = ?)", c.s1, c.s2);
        let rank = match kind {
            ParamType::Reference => 1,
            ParamType::Token | ParamType::Uri => 2,
            ParamType::Composite => 2,
            ParamType::String => 3,
            ParamType::Number | ParamType::Quantity => 4,
            ParamType::Date => 6,
        };
        Ok(Some((
            Crit::Set {
                from_where: format!(
                    "{table} {a} WHERE {a}.pid {pids} AND ({})",
                    ors.join(" OR ")
                ),
                idcol: format!("{a}.rid"),
                kind: IdKind::Rid,
                binds,
                negate,
                ordered,
            },
            rank,
        )))
    }

    /// `_has:Source:param:rest` — resources of `rt` that some `Source` refers to through `param`,
    /// where that `Source` matches `rest`.
    fn compile_has(
        &mut self,
        rt: &str,
        key: &str,
        rest: &str,
        value: &str,
        depth: usize,
    ) -> Result<Option<Ranked>, StoreError> {
        let mut parts = rest.splitn(3, ':');
        let (Some(source), Some(refp), Some(inner)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(
                key,
                "_has takes _has:Type:reference-parameter:parameter",
            ));
        };
        if !self.store.registry().model().is_resource(source) {
            return Err(bad(key, &format!("unknown resource type {source}")));
        }
        match self.store.indexer().param(source, refp) {
            Some(p) if p.kind == ParamType::Reference => {}
            _ => return self.unknown(key),
        }
        let Some((inner, _)) = self.compile(source, inner, value, depth + 1)? else {
            return Ok(None);
        };
        let set = self.positive(source, inner);
        let (sql, inner_binds) = self.as_kind(source, set, IdKind::Rid);
        let a = self.alias();
        let (pids, mut binds) = self.pids(source, refp, "");
        binds.push(B::S(rt.to_string()));
        binds.extend(inner_binds);
        Ok(Some((
            Crit::Set {
                from_where: format!(
                    "idx_reference {a} WHERE {a}.pid {pids} AND {a}.ttype = ? AND {a}.rid IN ({sql})"
                ),
                idcol: format!("{a}.tid"),
                kind: IdKind::Logical,
                binds,
                negate: false,
                ordered: false,
            },
            3,
        )))
    }

    /// `ref[:Type].rest` — resources whose reference `ref` points to a resource matching `rest`.
    fn compile_chain(
        &mut self,
        rt: &str,
        key: &str,
        link: &str,
        rest: &str,
        value: &str,
        depth: usize,
    ) -> Result<Option<Ranked>, StoreError> {
        let (pname, restrict) = match link.split_once(':') {
            Some((p, t)) => (p, Some(t)),
            None => (link, None),
        };
        let Some(sp) = self.store.indexer().param(rt, pname) else {
            return self.unknown(key);
        };
        if sp.kind != ParamType::Reference {
            return Err(bad(key, &format!("{pname} is not a reference parameter")));
        }
        let next_name = rest.split(['.', ':']).next().unwrap_or(rest).to_string();
        if sp.embeds {
            if let Some(t) = restrict.filter(|t| !sp.targets.iter().any(|x| x == t)) {
                return Err(bad(key, &format!("{pname} holds no {t}")));
            }
            return self.compile_embedded(rt, key, pname, rest, value, depth);
        }
        let targets: Vec<String> = match restrict {
            Some(t) if self.store.registry().model().is_resource(t) => vec![t.to_string()],
            Some(t) => return Err(bad(key, &format!("unknown resource type {t}"))),
            None => sp
                .targets
                .iter()
                .filter(|t| {
                    matches!(next_name.as_str(), "_id" | "_lastUpdated" | "_has")
                        || self.store.indexer().param(t, &next_name).is_some()
                })
                .cloned()
                .collect(),
        };
        if targets.is_empty() {
            return self.unknown(key);
        }
        // A target type no resource was ever indexed under for the next parameter cannot match:
        // leaving it out keeps the usual single-target chain free of ORs the planner must weigh.
        let indexed = |t: &str| {
            matches!(next_name.as_str(), "_id" | "_lastUpdated" | "_has")
                || !self.store.pids(t, &next_name, "").is_empty()
        };
        let live: Vec<&String> = targets.iter().filter(|t| indexed(t)).collect();
        let a = self.alias();
        let (pids, pid_binds) = self.pids(rt, pname, "");
        let mut binds = Vec::new();
        let mut ors = Vec::new();
        for t in live {
            let Some((inner, _)) = self.compile(t, rest, value, depth + 1)? else {
                return Ok(None);
            };
            let set = self.positive(t, inner);
            let (sql, inner_binds) = self.as_kind(t, set, IdKind::Logical);
            // Each branch carries the parameter, so each is one index range (pid, tid, ttype).
            ors.push(format!(
                "({a}.pid {pids} AND {a}.ttype = ? AND {a}.tid IN ({sql}))"
            ));
            binds.extend(pid_binds.iter().cloned());
            binds.push(B::S(t.clone()));
            binds.extend(inner_binds);
        }
        if ors.is_empty() {
            ors.push("1 = 0".to_string());
        }
        Ok(Some((
            Crit::Set {
                from_where: format!("idx_reference {a} WHERE ({})", ors.join(" OR ")),
                idcol: format!("{a}.rid"),
                kind: IdKind::Rid,
                binds,
                negate: false,
                ordered: false,
            },
            3,
        )))
    }

    /// `{pname}.{rest}` where `pname` embeds whole resources ([`SearchParam::embeds`]:
    /// `Bundle?composition.type=…`): the embedded resource's parameter `rest` starts with is
    /// read from its rows on this resource (`composition.type`), and a chain goes on from there
    /// (`composition.subject:Patient.name=…` is the chain `composition.subject:Patient` → `name`).
    /// `pname`'s own rows name the embedded resources (type and id).
    ///
    /// [`SearchParam::embeds`]: crate::index::SearchParam::embeds
    fn compile_embedded(
        &mut self,
        rt: &str,
        key: &str,
        pname: &str,
        rest: &str,
        value: &str,
        depth: usize,
    ) -> Result<Option<Ranked>, StoreError> {
        let next = rest.split(['.', ':']).next().unwrap_or(rest);
        let name = format!("{pname}.{next}");
        let after = &rest[next.len()..];
        if let Some(dot) = after.find('.') {
            // `:Type.…` or `.…`: a chain from the embedded resource's reference parameter.
            let link = format!("{name}{}", &after[..dot]);
            return self.compile_chain(rt, key, &link, &after[dot + 1..], value, depth + 1);
        }
        let modifier = after.strip_prefix(':');
        let crit = self.compile_param(rt, key, &name, modifier, value)?;
        match crit {
            // As in any chain, `:missing=true` asks about the embedded resources there are: a
            // Bundle with no Composition has no `composition.encounter` to miss.
            Some((
                Crit::Set {
                    from_where,
                    idcol,
                    kind: IdKind::Rid,
                    binds,
                    negate: true,
                    ..
                },
                rank,
            )) => {
                let e = self.alias();
                let (pids, mut all) = self.pids(rt, pname, "");
                all.extend(binds);
                Ok(Some((
                    Crit::Set {
                        from_where: format!(
                            "idx_reference {e} WHERE {e}.pid {pids} AND {e}.rid NOT IN (SELECT {idcol} FROM {from_where})"
                        ),
                        idcol: format!("{e}.rid"),
                        kind: IdKind::Rid,
                        binds: all,
                        negate: false,
                        ordered: false,
                    },
                    rank,
                )))
            }
            crit => Ok(crit),
        }
    }

    /// A composite's set. A composite whose rows are tuples (one element's components together)
    /// is read from `idx_composite`; one over the resource itself ([`SearchParam::conjunction`])
    /// from its components' rows, joined on the resource, or, for a code with a quantity and
    /// values without units, from its own rows in `idx_code_value`
    /// ([`SearchParam::code_value_rows`]). A union of both kinds (`combo-code-value-quantity`) is
    /// the union of their sets. With `missing`, `value` is `true` (no tuple: the complement) or
    /// `false`.
    ///
    /// [`SearchParam::conjunction`]: crate::index::SearchParam::conjunction
    /// [`SearchParam::code_value_rows`]: crate::index::SearchParam::code_value_rows
    fn composite_crit(
        &mut self,
        rt: &str,
        name: &str,
        key: &str,
        value: &str,
        missing: bool,
    ) -> Result<Option<Ranked>, StoreError> {
        let negate = match (missing, value) {
            (false, _) => false,
            (true, "true") => true,
            (true, "false") => false,
            _ => return Err(bad(key, ":missing takes true or false")),
        };
        let indexer = self.store.indexer();
        let kinds: Vec<ParamType> = indexer
            .param(rt, name)
            .map(|p| p.components.iter().map(|c| c.kind).collect())
            .unwrap_or_default();
        let values: Vec<Vec<String>> = if missing {
            Vec::new()
        } else {
            split_unescaped(value, ',')
                .iter()
                .map(|v| {
                    let parts = split_unescaped(v, '$');
                    if parts.len() == kinds.len() {
                        Ok(parts)
                    } else {
                        Err(bad(
                            key,
                            &format!("a composite value has {} parts joined by $", kinds.len()),
                        ))
                    }
                })
                .collect::<Result<_, _>>()?
        };
        // A code with a quantity has rows of its own for values without a unit; `:missing` and a
        // unit are answered through the components.
        let code_values_answer = !missing
            && values
                .iter()
                .all(|p| p.get(1).is_none_or(|v| split_unescaped(v, '|').len() == 1));
        let (mut tuple_pids, mut conjunctions, mut code_value_pids) =
            (Vec::new(), Vec::new(), Vec::new());
        for m in self.store.member_codes(rt, name) {
            match indexer.param(rt, &m) {
                Some(p) if p.code_value_rows && code_values_answer => {
                    code_value_pids.extend(self.store.pids(rt, &m, ""))
                }
                Some(p) if !p.conjunction.is_empty() => conjunctions.push(p.conjunction.clone()),
                _ => tuple_pids.extend(self.store.pids(rt, &m, "")),
            }
        }
        // One `SELECT rid FROM …` (without the SELECT) per kind of member.
        let mut selects: Vec<(String, String, Vec<B>)> = Vec::new();
        let mut ordered = false;
        if !code_value_pids.is_empty() {
            let a = self.alias();
            let one_pid = code_value_pids.len() == 1;
            let (pids, mut binds) = pid_list(code_value_pids);
            let mut ors = Vec::new();
            for parts in &values {
                let [code, value] = parts.as_slice() else {
                    return Err(bad(key, "a code and a quantity joined by $"));
                };
                let code = self.value_cond(
                    &a,
                    cols("system", "code", "", "", ""),
                    ParamType::Token,
                    None,
                    None,
                    key,
                    code,
                    &mut binds,
                )?;
                let value = self.value_cond(
                    &a,
                    cols("", "", "", "val", ""),
                    ParamType::Quantity,
                    None,
                    None,
                    key,
                    value,
                    &mut binds,
                )?;
                ors.push(format!("({code} AND {value})"));
            }
            // A system and a code bind the key before `rid`: the rows come in row-id order.
            ordered = one_pid
                && ors.len() == 1
                && ors[0].starts_with(&format!("(({a}.system = ? AND {a}.code = ?) AND "));
            let sql = format!(
                "idx_code_value {a} WHERE {a}.pid {pids} AND ({})",
                ors.join(" OR ")
            );
            selects.push((sql, format!("{a}.rid"), binds));
        }
        if (conjunctions.is_empty() && selects.is_empty()) || !tuple_pids.is_empty() {
            let a = self.alias();
            let (pids, mut binds) = pid_list(tuple_pids);
            let mut sql = format!("idx_composite {a} WHERE {a}.pid {pids}");
            if !missing {
                let mut ors = Vec::new();
                for parts in &values {
                    let mut ands = Vec::new();
                    for (i, (part, kind)) in parts.iter().zip(&kinds).enumerate() {
                        ands.push(self.value_cond(
                            &a,
                            COMPONENT_COLS[i],
                            *kind,
                            None,
                            None,
                            key,
                            part,
                            &mut binds,
                        )?);
                    }
                    ors.push(format!("({})", ands.join(" AND ")));
                }
                sql.push_str(&format!(" AND ({})", ors.join(" OR ")));
            }
            selects.push((sql, format!("{a}.rid"), binds));
        }
        for conjuncts in conjunctions {
            selects.push(self.conjunction_select(rt, key, &conjuncts, &kinds, &values, missing)?);
        }
        let n_selects = selects.len();
        let (from_where, idcol, binds) = if selects.len() == 1 {
            selects.remove(0)
        } else {
            let a = self.alias();
            let mut binds = Vec::new();
            let union: Vec<String> = selects
                .into_iter()
                .map(|(fw, idcol, b)| {
                    binds.extend(b);
                    format!("SELECT {idcol} FROM {fw}")
                })
                .collect();
            (
                format!("resources {a} WHERE {a}.rid IN ({})", union.join(" UNION ")),
                format!("{a}.rid"),
                binds,
            )
        };
        Ok(Some((
            Crit::Set {
                from_where,
                idcol,
                kind: IdKind::Rid,
                binds,
                negate,
                ordered: ordered && n_selects == 1,
            },
            if missing { 5 } else { 2 },
        )))
    }

    /// The resources of a conjunctive composite: rows of the first component that match, each with
    /// a matching row of every other component in the same resource (`EXISTS`). Without values
    /// (`:missing`), resources with a value of every component.
    fn conjunction_select(
        &mut self,
        rt: &str,
        key: &str,
        conjuncts: &[crate::index::Conjunct],
        kinds: &[ParamType],
        values: &[Vec<String>],
        missing: bool,
    ) -> Result<(String, String, Vec<B>), StoreError> {
        let aliases: Vec<String> = conjuncts.iter().map(|_| self.alias()).collect();
        let (Some(first), Some(first_kind)) = (conjuncts.first(), kinds.first()) else {
            return Err(bad(key, "a composite without components"));
        };
        let a = &aliases[0];
        let (table0, cols0) = table_of(*first_kind);
        let (pids, mut binds) = self.pids(rt, &first.code, "");
        let mut sql = format!("{table0} {a} WHERE {a}.pid {pids}");
        // The other components, each `EXISTS` with `cond` (None: any value) on its row.
        let others = |c: &mut Self, binds: &mut Vec<B>, conds: &[Option<&String>]| {
            let mut out = String::new();
            for (i, (j, kind)) in conjuncts.iter().zip(kinds).enumerate().skip(1) {
                let b = &aliases[i];
                let (table, cols) = table_of(*kind);
                let (pids, pb) = c.pids(rt, &j.code, "");
                binds.extend(pb);
                out.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM {table} {b} WHERE {b}.rid = {a}.rid AND {b}.pid {pids}"
                ));
                if let Some(part) = conds[i] {
                    let cond = c.value_cond(b, cols, *kind, None, None, key, part, binds)?;
                    out.push_str(&format!(" AND {cond}"));
                }
                out.push(')');
            }
            Ok::<String, StoreError>(out)
        };
        if missing {
            let none = vec![None; conjuncts.len()];
            sql.push_str(&others(self, &mut binds, &none)?);
        } else {
            let mut ors = Vec::new();
            for parts in values {
                let first_cond = self.value_cond(
                    a,
                    cols0,
                    *first_kind,
                    None,
                    None,
                    key,
                    &parts[0],
                    &mut binds,
                )?;
                let conds: Vec<Option<&String>> = parts.iter().map(Some).collect();
                let rest = others(self, &mut binds, &conds)?;
                ors.push(format!("({first_cond}{rest})"));
            }
            sql.push_str(&format!(" AND ({})", ors.join(" OR ")));
        }
        Ok((sql, format!("{a}.rid"), binds))
    }

    /// The condition one value (no commas) puts on an index row.
    #[allow(clippy::too_many_arguments)]
    fn value_cond(
        &mut self,
        a: &str,
        c: Cols,
        kind: ParamType,
        modifier: Option<&str>,
        ref_type: Option<&str>,
        key: &str,
        v: &str,
        binds: &mut Vec<B>,
    ) -> Result<String, StoreError> {
        let col = |n: &str| format!("{a}.{n}");
        Ok(match kind {
            ParamType::Token => {
                let parts = split_unescaped(v, '|');
                match parts.as_slice() {
                    [code] => {
                        binds.push(B::S(unescape(code)));
                        format!("{} = ?", col(c.s2))
                    }
                    [sys, code] if sys.is_empty() => {
                        binds.push(B::S(String::new()));
                        binds.push(B::S(unescape(code)));
                        format!("({} = ? AND {} = ?)", col(c.s1), col(c.s2))
                    }
                    [sys, code] if code.is_empty() => {
                        binds.push(B::S(unescape(sys)));
                        format!("{} = ?", col(c.s1))
                    }
                    [sys, code] => {
                        binds.push(B::S(unescape(sys)));
                        binds.push(B::S(unescape(code)));
                        format!("({} = ? AND {} = ?)", col(c.s1), col(c.s2))
                    }
                    _ => return Err(bad(key, v)),
                }
            }
            ParamType::String => {
                let text = unescape(v);
                match modifier {
                    Some("exact") => {
                        binds.push(B::S(text));
                        format!("{} = ?", col(c.s2))
                    }
                    Some("contains") => {
                        binds.push(B::S(format!("%{}%", like_escape(&normalise(&text)))));
                        format!("{} LIKE ? ESCAPE '\\'", col(c.s1))
                    }
                    _ => {
                        let n = normalise(&text);
                        let upper = format!("{n}{}", char::MAX);
                        binds.push(B::S(n));
                        binds.push(B::S(upper));
                        let b = self.bytewise;
                        format!("({0}{b} >= ? AND {0}{b} < ?)", col(c.s1))
                    }
                }
            }
            ParamType::Reference => {
                let (t, i) = reference_key(&unescape(v));
                match (ref_type, t.as_str()) {
                    (Some(rt), "") => {
                        binds.push(B::S(rt.to_string()));
                        binds.push(B::S(i));
                        format!("({} = ? AND {} = ?)", col(c.s1), col(c.s2))
                    }
                    (Some(rt), t) if rt != t => "1 = 0".to_string(),
                    (_, "") => {
                        binds.push(B::S(i));
                        format!("{} = ?", col(c.s2))
                    }
                    (_, t) => {
                        binds.push(B::S(t.to_string()));
                        binds.push(B::S(i));
                        format!("({} = ? AND {} = ?)", col(c.s1), col(c.s2))
                    }
                }
            }
            ParamType::Uri => {
                // A versioned canonical is one row, `url|version`; a bare URL finds every version
                // of it too. Bytewise on PostgreSQL, where the index is (`idx_uri_c`).
                let u = unescape(v);
                let val = format!("{}{}", col(c.s2), self.bytewise);
                match modifier {
                    Some("below") => {
                        binds.push(B::S(format!("{}%", like_escape(&u))));
                        format!("{val} LIKE ? ESCAPE '\\'")
                    }
                    Some("above") => {
                        // The URL without its version is what must be a prefix of the value.
                        let bare = match self.store.backend() {
                            Backend::Sqlite => format!(
                                "(CASE WHEN instr({0}, '|') > 0 THEN substr({0}, 1, instr({0}, '|') - 1) ELSE {0} END)",
                                col(c.s2)
                            ),
                            Backend::Postgres => format!("split_part({}, '|', 1)", col(c.s2)),
                        };
                        binds.push(B::S(u));
                        format!("substr(?, 1, length({bare})) = {bare} AND length({bare}) > 0")
                    }
                    _ if u.contains('|') => {
                        binds.push(B::S(u));
                        format!("{val} = ?")
                    }
                    _ => {
                        binds.push(B::S(format!("{u}|")));
                        binds.push(B::S(format!("{u}}}")));
                        binds.push(B::S(u));
                        format!("(({val} >= ? AND {val} < ?) OR {val} = ?)")
                    }
                }
            }
            ParamType::Date => self.date_cond(&col(c.n1), &col(c.n2), key, v, binds)?,
            ParamType::Number => number_cond(&col(c.n1), key, v, binds)?,
            ParamType::Quantity => {
                let parts = split_unescaped(v, '|');
                match parts.as_slice() {
                    [n] => number_cond(&col(c.n1), key, n, binds)?,
                    [n, sys, code] => {
                        let mut conds = vec![number_cond(&col(c.n1), key, n, binds)?];
                        let (sys, code) = (unescape(sys), unescape(code));
                        if !sys.is_empty() {
                            conds.push(format!("{} = ?", col(c.s1)));
                            binds.push(B::S(sys.clone()));
                        }
                        if !code.is_empty() {
                            if sys.is_empty() {
                                conds.push(format!("({} = ? OR {} = ?)", col(c.s2), col(c.s3)));
                                binds.push(B::S(code.clone()));
                            } else {
                                conds.push(format!("{} = ?", col(c.s2)));
                            }
                            binds.push(B::S(code));
                        }
                        format!("({})", conds.join(" AND "))
                    }
                    _ => return Err(bad(key, "quantity takes number or number|system|code")),
                }
            }
            ParamType::Composite => return Err(bad(key, "composites do not nest")),
        })
    }

    /// A date value against an inclusive range `[lo, hi]` (the target's), per the R4 prefix table.
    fn date_cond(
        &self,
        lo: &str,
        hi: &str,
        key: &str,
        v: &str,
        binds: &mut Vec<B>,
    ) -> Result<String, StoreError> {
        let (pre, rest) = prefix(v);
        let d = DateTime::parse(rest, true).ok_or_else(|| bad(key, v))?;
        let (slo, shi) = date_range(&d).ok_or_else(|| bad(key, v))?;
        let within = format!("({lo} >= ? AND {hi} <= ?)");
        let (sql, vals): (String, Vec<i64>) = match pre {
            "eq" => (within, vec![slo, shi]),
            "ne" => (format!("NOT {within}"), vec![slo, shi]),
            "gt" => (format!("{hi} > ?"), vec![shi]),
            "lt" => (format!("{lo} < ?"), vec![slo]),
            "ge" => (format!("({hi} > ? OR {within})"), vec![shi, slo, shi]),
            "le" => (format!("({lo} < ? OR {within})"), vec![slo, slo, shi]),
            "sa" => (format!("{lo} > ?"), vec![shi]),
            "eb" => (format!("{hi} < ?"), vec![slo]),
            _ => {
                // ap: within a tenth of the distance from now, at least a day.
                let gap = approx_gap(self.now_ms, slo, shi);
                (
                    format!("({hi} >= ? AND {lo} <= ?)"),
                    vec![slo - gap, shi + gap],
                )
            }
        };
        binds.extend(vals.into_iter().map(B::I));
        Ok(sql)
    }
}

/// The widening `ap` applies to a date range: 10 % of its distance from `now`, at least one day.
pub fn approx_gap(now_ms: i64, lo: i64, hi: i64) -> i64 {
    let dist = if now_ms < lo {
        lo - now_ms
    } else if now_ms > hi {
        now_ms - hi
    } else {
        0
    };
    (dist / 10).max(86_400_000)
}

/// The implicit range of a decimal as written: `100` is [99.5, 100.5), `1.50` is [1.495, 1.505).
pub fn number_bounds(text: &str) -> Option<(f64, f64, f64)> {
    let n: f64 = text.parse().ok()?;
    if !n.is_finite() {
        return None;
    }
    let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
    let places = mantissa.split('.').nth(1).map(str::len).unwrap_or(0) as i32;
    let exp: i32 = text
        .split(['e', 'E'])
        .nth(1)
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    let half = 0.5 * 10f64.powi(exp - places);
    Some((n, n - half, n + half))
}

fn number_cond(col: &str, key: &str, v: &str, binds: &mut Vec<B>) -> Result<String, StoreError> {
    let (pre, rest) = prefix(v);
    let (n, lo, hi) = number_bounds(rest).ok_or_else(|| bad(key, v))?;
    Ok(match pre {
        "eq" => {
            binds.extend([B::F(lo), B::F(hi)]);
            format!("({col} >= ? AND {col} < ?)")
        }
        "ne" => {
            binds.extend([B::F(lo), B::F(hi)]);
            format!("NOT ({col} >= ? AND {col} < ?)")
        }
        "ap" => {
            let d = (n * 0.1).abs();
            binds.extend([B::F(n - d), B::F(n + d)]);
            format!("({col} >= ? AND {col} <= ?)")
        }
        op => {
            binds.push(B::F(n));
            let sym = match op {
                "lt" | "eb" => "<",
                "gt" | "sa" => ">",
                "le" => "<=",
                _ => ">=",
            };
            format!("{col} {sym} ?")
        }
    })
}

impl Store {
    /// A search statement with its arguments. On PostgreSQL it is not kept prepared: a kept
    /// statement switches to a generic plan after five runs, and with parameter ids and codes as
    /// skewed as `gender=female` against one patient's codes that plan was off by 15× (2.7 → 42 ms
    /// for a patient's codes sorted by date, 81 → 148 ms for women born before 1960). Planning each
    /// run costs about 0.3 ms. SQLite plans once per statement text, so it keeps its statements.
    fn search_statement<'q>(
        &self,
        sql: &'q str,
        binds: &[B],
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        let mut query = sqlx::query(sql).persistent(self.backend() == Backend::Sqlite);
        for b in binds {
            query = match b {
                B::S(s) => query.bind(s.clone()),
                B::I(i) => query.bind(*i),
                B::F(f) => query.bind(*f),
            };
        }
        query
    }

    /// Searches one resource type.
    pub async fn search(&self, rt: &str, q: &SearchQuery) -> Result<SearchResult, StoreError> {
        if let Some(m) = q.malformed.first() {
            return Err(StoreError::BadSearchValue {
                param: m.clone(),
                value: String::new(),
            });
        }
        let (crits, ignored) = self.compile_criteria(rt, q)?;
        let walkable = q.sort.is_empty();
        let (plan, probed) = if walkable {
            self.choose_plan(&crits, q.total).await?
        } else {
            (Plan::collect(first_driver(&crits)), vec![None; crits.len()])
        };
        let Assembled {
            from,
            where_sql,
            mut binds,
            rid_order,
            driven,
        } = assemble(rt, &crits, plan, &[], self.backend());
        // Every probed set is larger than the cap on its own.
        let smallest_probed = smallest(&probed);
        let broad = smallest_probed.is_some_and(|i| probed[i].is_some_and(|n| n > COUNT_CAP));
        // One set is the whole query: it can be counted from the index alone (index rows exist
        // for current resources only).
        let index_count = match crits.as_slice() {
            [(c, _)] => rid_set(c),
            _ => None,
        };
        // When a value index drives the query, sort its (few) matches instead of letting SQLite
        // walk the `_lastUpdated` index to avoid a sort (`+ 0` hides that index from ORDER BY).
        let lu = if driven && self.backend() == Backend::Sqlite {
            "r.lu_ms + 0"
        } else {
            "r.lu_ms"
        };
        // Text sorts compare bytes on both backends (PostgreSQL's locale collations would not).
        let bytewise = match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " COLLATE \"C\"",
        };
        let mut order = Vec::new();
        let mut order_binds = Vec::new();
        for s in &q.sort {
            let dir = if s.descending { "DESC" } else { "ASC" };
            let expr = match s.param.as_str() {
                "_id" => format!("r.id{bytewise}"),
                "_lastUpdated" => lu.to_string(),
                p => {
                    let Some(sp) = self.indexer().param(rt, p) else {
                        return Err(StoreError::UnknownParameter(format!("_sort={p}")));
                    };
                    let (table, c) = table_of(sp.kind);
                    let col = match sp.kind {
                        ParamType::Date if s.descending => c.n2,
                        ParamType::Date | ParamType::Number | ParamType::Quantity => c.n1,
                        ParamType::String => c.s1,
                        ParamType::Token | ParamType::Reference | ParamType::Uri => c.s2,
                        ParamType::Composite => {
                            return Err(bad("_sort", &format!("{p} is a composite")))
                        }
                    };
                    let agg = if s.descending { "MAX" } else { "MIN" };
                    let ids = self.pids(rt, p, "");
                    let marks = vec!["?"; ids.len().max(1)].join(", ");
                    if ids.is_empty() {
                        order_binds.push(B::I(-1));
                    }
                    order_binds.extend(ids.into_iter().map(B::I));
                    let coll = match sp.kind {
                        ParamType::Date | ParamType::Number | ParamType::Quantity => "",
                        _ => bytewise,
                    };
                    format!("(SELECT {agg}(s.{col}{coll}) FROM {table} s WHERE s.rid = r.rid AND s.pid IN ({marks}))")
                }
            };
            order.push(format!("{expr} {dir} NULLS LAST"));
        }
        if q.sort.is_empty() {
            // The server's own order (the spec leaves it open): row ids, i.e. the order resources
            // were first stored. Pages stay stable while new resources arrive, and SQLite reads
            // the matches in that order straight from its row-id lookups, with no sort.
            order.push(format!("{rid_order} ASC"));
        } else {
            order.push(format!("r.id{bytewise} ASC"));
        }
        let started = std::time::Instant::now();
        let count_sql = match (q.total, index_count) {
            (Total::None, _) => None,
            (Total::Accurate, Some((idcol, from_where, b))) => Some((
                format!("SELECT COUNT(DISTINCT {idcol}) FROM {from_where}"),
                b.to_vec(),
            )),
            // Counted already while choosing the plan.
            (Total::Bounded, Some(_)) if probed[0].is_some() => None,
            (Total::Bounded, Some((idcol, from_where, b))) => Some((
                format!(
                    "SELECT COUNT(*) FROM (SELECT DISTINCT {idcol} FROM {from_where} LIMIT {}) n",
                    COUNT_CAP + 1
                ),
                b.to_vec(),
            )),
            // Every set is larger than the cap: counting their intersection to the cap would
            // walk thousands of rows for a number the page does not need.
            (Total::Bounded, None) if broad => None,
            (total, None) => {
                // Counting: collecting the smallest set beats reading along an order.
                let driver = smallest_probed.or(first_driver(&crits));
                // An exact count over several broad sets: SQLite intersects their row ids about
                // twice as fast as it probes one set per row of another (193 against 388 ms for
                // 86k women and 52k born before 1960 at 1M resources).
                let also = match (total, driver.map(|d| &crits[d].0)) {
                    (Total::Accurate, Some(Crit::Set { kind, .. })) if broad => crits
                        .iter()
                        .enumerate()
                        .filter(|(i, (c, _))| {
                            Some(*i) != driver
                                && probed[*i].is_some()
                                && matches!(c, Crit::Set { negate: false, kind: k, .. } if k == kind)
                        })
                        .map(|(i, _)| i)
                        .collect(),
                    _ => Vec::new(),
                };
                let c = assemble(rt, &crits, Plan::collect(driver), &also, self.backend());
                let inner = format!("SELECT 1 FROM {} WHERE {}", c.from, c.where_sql);
                let sql = if total == Total::Accurate {
                    format!("SELECT COUNT(*) FROM ({inner}) n")
                } else {
                    format!("SELECT COUNT(*) FROM ({inner} LIMIT {}) n", COUNT_CAP + 1)
                };
                Some((sql, c.binds))
            }
        };
        let page_sql = self.sql(&format!(
            "SELECT r.id, r.version, r.last_updated, r.deleted, r.body FROM {from} WHERE {where_sql} ORDER BY {} LIMIT ? OFFSET ?",
            order.join(", ")
        ));
        binds.extend(order_binds);
        let limit = q.count.clamp(0, 1000);
        let offset = q.offset.max(0);
        let rows = self
            .search_statement(&page_sql, &binds)
            .bind(limit)
            .bind(offset)
            .fetch_all(self.pool())
            .await?;
        // A short page that is not past the end holds the last matches: the total is known
        // without a count, which would walk the same rows again.
        let found = rows.len() as i64;
        let page_ends = limit > 0 && found < limit && (offset == 0 || found > 0);
        let total = match count_sql {
            _ if q.total == Total::None => None,
            _ if page_ends => Some(offset + found),
            Some((sql, b)) => {
                let n: i64 = self
                    .search_statement(&self.sql(&sql), &b)
                    .fetch_one(self.pool())
                    .await?
                    .try_get(0)?;
                (q.total == Total::Accurate || n <= COUNT_CAP).then_some(n)
            }
            None => match (q.total, index_count, probed.first()) {
                (Total::Bounded, Some(_), Some(Some(n))) => (*n <= COUNT_CAP).then_some(*n),
                _ => None,
            },
        };
        let mut resources = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get(0)?;
            let body: Option<String> = r.try_get(4)?;
            let (resource, text) = match (body, q.outline) {
                (Some(b), Some(keys)) => (Some(parse_outline(&b, keys)?), Some(b)),
                (b, _) => (
                    b.map(|b| serde_json::from_str::<Value>(&b)).transpose()?,
                    None,
                ),
            };
            resources.push(Stored {
                resource_type: rt.to_string(),
                id,
                version: r.try_get(1)?,
                last_updated: r.try_get(2)?,
                deleted: false,
                resource,
                text,
            });
        }
        tracing::debug!(
            rt,
            params = q.params.len(),
            total = ?total,
            page = resources.len(),
            micros = started.elapsed().as_micros() as u64,
            "search"
        );
        let included = self
            .resolve_includes(&resources, &q.includes, &q.revincludes)
            .await?;
        Ok(SearchResult {
            total,
            resources,
            ignored,
            included,
            reindexing: self.search_may_be_incomplete(rt, q),
        })
    }

    /// The ids of every current resource of `rt` matching the criteria of `q` (no paging): for
    /// conditional update and delete, and for exports restricted by a query.
    pub async fn search_ids(&self, rt: &str, q: &SearchQuery) -> Result<Vec<String>, StoreError> {
        let (where_sql, binds, _, _) = self.compile_where(rt, q)?;
        let sql = self.sql(&format!(
            "SELECT r.id FROM resources r WHERE {where_sql} ORDER BY r.id"
        ));
        let rows = self
            .search_statement(&sql, &binds)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// The `(type, id)` of every current resource of the given types that matches the query, in
    /// one statement: a caller that looks the same criterion up across several types (the sharing
    /// service's earlier contents of a bundle identifier) waits for one reader, not one per type.
    /// Ordered by type, then id. Each type must have the query's parameters (a common parameter
    /// such as `_id` or `_source`, or one of the same name on each).
    pub async fn search_ids_in(
        &self,
        types: &[&str],
        q: &SearchQuery,
    ) -> Result<Vec<(String, String)>, StoreError> {
        if types.is_empty() {
            return Ok(Vec::new());
        }
        let mut selects = Vec::with_capacity(types.len());
        let mut all_binds = Vec::new();
        for rt in types {
            let (where_sql, binds, _, _) = self.compile_where(rt, q)?;
            selects.push(format!(
                "SELECT r.rtype, r.id FROM resources r WHERE {where_sql}"
            ));
            all_binds.extend(binds);
        }
        let sql = self.sql(&format!("{} ORDER BY 1, 2", selects.join(" UNION ALL ")));
        let rows = self
            .search_statement(&sql, &all_binds)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect()
    }

    /// The compiled criteria of a query, most selective kind first, and the parameters lenient
    /// handling ignored.
    fn compile_criteria(
        &self,
        rt: &str,
        q: &SearchQuery,
    ) -> Result<(Vec<Ranked>, Vec<String>), StoreError> {
        let mut c = Compiler {
            store: self,
            strict: q.strict,
            aliases: 0,
            ignored: Vec::new(),
            now_ms: q
                .now_ms
                .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
            bytewise: match self.backend() {
                Backend::Sqlite => "",
                Backend::Postgres => " COLLATE \"C\"",
            },
        };
        let mut crits = Vec::new();
        for p in &q.params {
            if let Some(cr) = c.compile(rt, &p.key(), &p.value, 0)? {
                crits.push(cr);
            }
        }
        crits.sort_by_key(|(_, rank)| *rank);
        Ok((crits, c.ignored))
    }

    /// The WHERE clause over `resources r` for a query's criteria, with the first set of row ids
    /// driving it: its text, binds, whether an index set drives it, and the ignored parameters.
    fn compile_where(
        &self,
        rt: &str,
        q: &SearchQuery,
    ) -> Result<(String, Vec<B>, bool, Vec<String>), StoreError> {
        let (crits, ignored) = self.compile_criteria(rt, q)?;
        let a = assemble(
            rt,
            &crits,
            Plan::collect(first_driver(&crits)),
            &[],
            self.backend(),
        );
        Ok((a.where_sql, a.binds, a.driven, ignored))
    }

    /// The distinct row ids of a set, counted up to [`COUNT_CAP`] + 1 (any larger set counts
    /// as that): what a plan is chosen by, and a bounded total.
    ///
    /// SQLite stops a `DISTINCT … LIMIT` at the limit. PostgreSQL hashes every row of the set
    /// before it limits a `DISTINCT` (86k rows for `gender=female` at 1M resources), so there the
    /// set's first rows are read as they come and their distinct ids counted: the count is exact
    /// when fewer rows than the limit came, and above the cap once that many distinct ids came.
    /// Only a set whose resources repeat values (names, several rows each) takes a second, longer
    /// read, and past that the full count.
    async fn count_to_cap(
        &self,
        idcol: &str,
        from_where: &str,
        binds: &[B],
    ) -> Result<i64, StoreError> {
        let cap = COUNT_CAP + 1;
        if self.backend() == Backend::Postgres {
            for limit in [cap, 16 * cap] {
                let sql = format!(
                    "SELECT COUNT(*), COUNT(DISTINCT n.id) FROM (SELECT {idcol} AS id FROM {from_where} LIMIT {limit}) n"
                );
                let row = self
                    .search_statement(&self.sql(&sql), binds)
                    .fetch_one(self.pool())
                    .await?;
                let (rows, distinct): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                if rows < limit {
                    return Ok(distinct);
                }
                if distinct >= cap {
                    return Ok(cap);
                }
            }
        }
        let distinct_to_cap = format!(
            "SELECT COUNT(*) FROM (SELECT DISTINCT {idcol} FROM {from_where} LIMIT {cap}) n"
        );
        Ok(self
            .search_statement(&self.sql(&distinct_to_cap), binds)
            .fetch_one(self.pool())
            .await?
            .try_get(0)?)
    }

    /// Picks how a page of a query without `_sort` is read, from each set of row ids
    /// counted up to [`COUNT_CAP`] + 1 (in the order of their likely selectivity): a small set is
    /// collected; else a set whose index rows come in row-id order is read along that order; else
    /// the smallest set within the cap is collected; else the type's rows are walked. Reading in
    /// row-id order stops at the page's end: for broad criteria (a common code, a gender) that
    /// reads a few hundred rows instead of collecting and sorting tens of thousands of matches.
    /// Also returns the count of each probed set, by criterion.
    async fn choose_plan(
        &self,
        crits: &[Ranked],
        total: Total,
    ) -> Result<(Plan, Vec<Option<i64>>), StoreError> {
        /// A set this small drives the query without probing the others.
        const SMALL: i64 = 100;
        let mut counts = vec![None; crits.len()];
        // `_id` and reverse chains (sets of logical ids) keep the plan SQLite makes of them.
        let fixed = crits.iter().any(|(c, rank)| {
            *rank == 0
                || matches!(
                    c,
                    Crit::Set {
                        kind: IdKind::Logical,
                        negate: false,
                        ..
                    }
                )
        });
        if fixed {
            return Ok((Plan::collect(first_driver(crits)), counts));
        }
        // One set read in row-id order is the page whatever its size; only a total needs a count.
        if let ([(Crit::Set { ordered: true, .. }, _)], Total::None) = (crits, total) {
            return Ok((Plan::Along(0), counts));
        }
        let mut best: Option<(usize, i64)> = None;
        for (i, (crit, _)) in crits.iter().enumerate() {
            let Some((idcol, from_where, binds)) = rid_set(crit) else {
                continue;
            };
            let n = self.count_to_cap(idcol, from_where, binds).await?;
            counts[i] = Some(n);
            if best.is_none_or(|(_, m)| n < m) {
                best = Some((i, n));
            }
            if n < SMALL {
                break;
            }
        }
        let plan = match best {
            Some((i, n)) if n < SMALL => Plan::Collect(i),
            _ => {
                let ordered = crits.iter().enumerate().position(|(i, (c, _))| {
                    counts[i].is_some() && matches!(c, Crit::Set { ordered: true, .. })
                });
                match (ordered, best) {
                    (Some(i), _) => Plan::Along(i),
                    (None, Some((i, n))) if n <= COUNT_CAP => Plan::Collect(i),
                    _ => Plan::Walk,
                }
            }
        };
        Ok((plan, counts))
    }
}

/// Parses the top-level elements of a JSON object named in `keys` and skips the others without
/// building them (most of the cost of parsing a stored resource is allocating its tree).
pub fn parse_outline(text: &str, keys: &[&str]) -> Result<Value, serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Outline<'k>(&'k [&'k str]);

    impl<'de> DeserializeSeed<'de> for Outline<'_> {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Outline<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(k) = m.next_key::<String>()? {
                if self.0.contains(&k.as_str()) {
                    let v = m.next_value::<Value>()?;
                    out.insert(k, v);
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Value::Object(out))
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    let v = Outline(keys).deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// The criterion with the smallest probed set, if any was probed.
fn smallest(probed: &[Option<i64>]) -> Option<usize> {
    probed
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.map(|n| (i, n)))
        .min_by_key(|(_, n)| *n)
        .map(|(i, _)| i)
}

/// The parts of a criterion that is a plain set of row ids (what can drive a query or be
/// counted from the index alone).
fn rid_set(crit: &Crit) -> Option<(&str, &str, &[B])> {
    match crit {
        Crit::Set {
            from_where,
            idcol,
            kind: IdKind::Rid,
            binds,
            negate: false,
            ..
        } => Some((idcol, from_where, binds)),
        _ => None,
    }
}

/// The first set (of either kind) not negated, which drives a query when nothing better is known.
fn first_driver(crits: &[Ranked]) -> Option<usize> {
    crits
        .iter()
        .position(|(c, _)| matches!(c, Crit::Set { negate: false, .. }))
}

/// How a page reaches its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// The criterion's set is collected (`r.rid IN (…)`) and the rest probed per row.
    Collect(usize),
    /// The criterion's index rows are read in row-id order, joined to their resources.
    Along(usize),
    /// The type's rows are walked in row-id order and every criterion probed.
    Walk,
}

impl Plan {
    fn collect(driver: Option<usize>) -> Plan {
        driver.map_or(Plan::Walk, Plan::Collect)
    }
}

/// A statement's parts: `FROM`, `WHERE` and its binds, the default order's column, and whether a
/// set drives it.
struct Assembled {
    from: String,
    where_sql: String,
    binds: Vec<B>,
    rid_order: String,
    driven: bool,
}

/// The statement over `resources r` for a plan; every criterion but the driving one is probed per
/// row (`EXISTS`), except the sets in `also`, which a collected driver's set is intersected with.
///
/// On PostgreSQL a plan that reads rows in order and stops at the page's end fences its probes
/// with `OFFSET 0`: otherwise the planner turns each `EXISTS` into a join, estimates the sets from
/// statistics that treat parameter and value as independent (a hundred rows where there are
/// thousands), and hashes every match before sorting them (235 against 3.4 ms for 8,662 women and
/// 5,060 born before 1960 among 100k resources).
fn assemble(rt: &str, crits: &[Ranked], plan: Plan, also: &[usize], backend: Backend) -> Assembled {
    let fence = match (backend, plan) {
        (Backend::Postgres, Plan::Walk | Plan::Along(_)) => " OFFSET 0",
        _ => "",
    };
    let mut wheres: Vec<String> = Vec::new();
    let mut binds: Vec<B> = Vec::new();
    let mut from = "resources r".to_string();
    let mut rid_order = "r.rid".to_string();
    let driver = match plan {
        Plan::Collect(i) | Plan::Along(i) => Some(i),
        Plan::Walk => None,
    };
    match (plan, driver.map(|i| &crits[i].0)) {
        (
            Plan::Along(_),
            Some(Crit::Set {
                from_where,
                idcol,
                binds: b,
                ..
            }),
        ) => {
            // `CROSS JOIN` keeps SQLite reading the index first, in its order.
            let (table, cond) = from_where
                .split_once(" WHERE ")
                .unwrap_or((from_where, "1 = 1"));
            from = format!("{table} CROSS JOIN resources r");
            wheres.push(format!("r.rid = {idcol}"));
            wheres.push(cond.to_string());
            binds.extend(b.iter().cloned());
            rid_order = idcol.clone();
        }
        // Row ids are of this type already (parameter ids are per type), and without
        // `r.rtype = ?` SQLite cannot mistake the type index for the better path.
        (
            _,
            Some(Crit::Set {
                from_where,
                idcol,
                kind,
                binds: b,
                ..
            }),
        ) => {
            if *kind == IdKind::Logical {
                wheres.push("r.rtype = ?".into());
                binds.push(B::S(rt.to_string()));
            }
            let mut sets = format!("SELECT {idcol} FROM {from_where}");
            binds.extend(b.iter().cloned());
            for &j in also {
                if let Crit::Set {
                    from_where,
                    idcol,
                    binds: b,
                    ..
                } = &crits[j].0
                {
                    sets.push_str(&format!(" INTERSECT SELECT {idcol} FROM {from_where}"));
                    binds.extend(b.iter().cloned());
                }
            }
            wheres.push(format!("r.{} IN ({sets})", kind.column()));
        }
        _ => {
            wheres.push("r.rtype = ?".into());
            binds.push(B::S(rt.to_string()));
        }
    }
    wheres.push("r.deleted = 0".into());
    for (i, (crit, _)) in crits.iter().enumerate() {
        if Some(i) == driver || also.contains(&i) {
            continue;
        }
        match crit {
            Crit::Direct(cond, b) => {
                wheres.push(cond.replace("@R", "r"));
                binds.extend(b.iter().cloned());
            }
            Crit::Set {
                from_where,
                idcol,
                kind,
                binds: b,
                negate,
                ..
            } => {
                wheres.push(format!(
                    "{}EXISTS (SELECT 1 FROM {from_where} AND {idcol} = r.{}{fence})",
                    if *negate { "NOT " } else { "" },
                    kind.column()
                ));
                binds.extend(b.iter().cloned());
            }
        }
    }
    Assembled {
        from,
        where_sql: wheres.join(" AND "),
        binds,
        rid_order,
        driven: driver.is_some(),
    }
}

#[cfg(test)]
mod outline_tests {
    use super::parse_outline;
    use proptest::prelude::*;
    use serde_json::Value;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z\"\\\\ é日\n]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(("[a-z]{1,3}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The outline is the full parse restricted to the named keys, in the stored order.
        #[test]
        fn outline_is_the_full_parse_restricted(
            fields in prop::collection::vec(("[a-z]{1,3}", json()), 0..8),
            keys in prop::collection::vec("[a-z]{1,3}", 0..4),
        ) {
            let obj: serde_json::Map<String, Value> = fields.into_iter().collect();
            let text = Value::Object(obj.clone()).to_string();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let want: serde_json::Map<String, Value> = obj
                .into_iter()
                .filter(|(k, _)| keys.contains(&k.as_str()))
                .collect();
            prop_assert_eq!(parse_outline(&text, &keys).ok(), Some(Value::Object(want)));
        }

        /// Text that is not one JSON object is refused, whatever is skipped.
        #[test]
        fn malformed_text_is_refused(text in "[\\[\\]{}:,\"a-z0-9 ]{0,24}") {
            let full = serde_json::from_str::<Value>(&text).ok().filter(Value::is_object);
            prop_assert_eq!(parse_outline(&text, &[]).is_ok(), full.is_some());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{assemble, number_bounds, split_unescaped, unescape, Crit, IdKind, Plan, Ranked};
    use crate::Backend;

    /// PostgreSQL keeps a walk's probes per row (fenced), so the walk can stop at the page's end;
    /// a collected set's probes, and every SQLite probe, are left to the planner.
    #[test]
    fn postgres_walks_fence_their_probes() {
        let set = |pid: i64| -> Ranked {
            (
                Crit::Set {
                    from_where: format!("idx_token x{pid} WHERE x{pid}.pid = {pid}"),
                    idcol: format!("x{pid}.rid"),
                    kind: IdKind::Rid,
                    binds: Vec::new(),
                    negate: false,
                    ordered: false,
                },
                5,
            )
        };
        let crits = [set(1), set(2)];
        let fenced = |plan: Plan, backend: Backend| {
            let a = assemble("Patient", &crits, plan, &[], backend);
            a.where_sql.matches("OFFSET 0)").count()
        };
        assert_eq!(fenced(Plan::Walk, Backend::Postgres), 2);
        assert_eq!(fenced(Plan::Along(0), Backend::Postgres), 1);
        assert_eq!(fenced(Plan::Collect(0), Backend::Postgres), 0);
        for plan in [Plan::Walk, Plan::Along(0), Plan::Collect(0)] {
            assert_eq!(fenced(plan, Backend::Sqlite), 0, "{plan:?}");
        }
    }

    #[test]
    fn escapes_split_only_their_level() {
        assert_eq!(split_unescaped(r"a\,b,c", ','), vec![r"a\,b", "c"]);
        assert_eq!(unescape(r"a\,b\$c\|d\\e"), r"a,b$c|d\e");
        assert_eq!(split_unescaped(r"x|y\|z", '|'), vec!["x", r"y\|z"]);
    }

    #[test]
    fn implicit_number_ranges() {
        let r = |t: &str| number_bounds(t).map(|(_, lo, hi)| (lo, hi));
        assert_eq!(r("100"), Some((99.5, 100.5)));
        let (lo, hi) = r("1.50").unwrap_or_default();
        assert!((lo - 1.495).abs() < 1e-12 && (hi - 1.505).abs() < 1e-12);
        let (lo, hi) = r("1e2").unwrap_or_default();
        assert!((lo - 50.0).abs() < 1e-9 && (hi - 150.0).abs() < 1e-9);
        assert_eq!(r("abc"), None);
        assert_eq!(r("NaN"), None);
    }
}
