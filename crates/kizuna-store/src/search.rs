//! Search over the index tables: each parameter becomes an `EXISTS` over its table (AND across
//! parameters, OR across comma-separated values), with FHIR's modifiers and comparison prefixes.

use kizuna_fhir::fhirpath::DateTime;
use serde_json::Value;
use sqlx::Row;

use crate::index::{date_range, normalise, ParamType};
use crate::{Store, StoreError, Stored};

/// One `name[:modifier]=value` of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParamValue {
    /// Parameter code.
    pub name: String,
    /// Modifier without the colon (`exact`, `contains`, `not`, `missing` …).
    pub modifier: Option<String>,
    /// The raw value (may hold commas for OR).
    pub value: String,
}

/// Sort keys the store supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// `_lastUpdated` ascending.
    LastUpdated,
    /// `-_lastUpdated`.
    LastUpdatedDesc,
    /// `_id`.
    Id,
}

/// A search request.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    /// Parameters (AND).
    pub params: Vec<SearchParamValue>,
    /// Page size.
    pub count: i64,
    /// Offset of the page.
    pub offset: i64,
    /// Sort.
    pub sort: SortKey,
    /// Unknown parameters are errors (`Prefer: handling=strict`) rather than ignored.
    pub strict: bool,
    /// `_include` values.
    pub includes: Vec<crate::Include>,
    /// `_revinclude` values.
    pub revincludes: Vec<crate::Include>,
    /// Control parameters whose value could not be read (reported by [`Store::search`]).
    pub malformed: Vec<String>,
}

impl Default for SearchQuery {
    fn default() -> Self {
        SearchQuery {
            params: Vec::new(),
            count: 50,
            offset: 0,
            sort: SortKey::LastUpdated,
            strict: true,
            includes: Vec::new(),
            revincludes: Vec::new(),
            malformed: Vec::new(),
        }
    }
}

impl SearchQuery {
    /// Parses `a=b&c:exact=d` pairs (already percent-decoded).
    pub fn from_pairs(pairs: &[(String, String)]) -> SearchQuery {
        let mut q = SearchQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "_count" => q.count = v.parse().unwrap_or(50),
                "_offset" => q.offset = v.parse().unwrap_or(0),
                "_sort" => {
                    q.sort = match v.as_str() {
                        "-_lastUpdated" => SortKey::LastUpdatedDesc,
                        "_id" => SortKey::Id,
                        _ => SortKey::LastUpdated,
                    }
                }
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
    /// Matches in total.
    pub total: i64,
    /// This page.
    pub resources: Vec<Stored>,
    /// Parameters that were ignored (lenient handling).
    pub ignored: Vec<String>,
    /// Resources brought in by `_include`/`_revinclude` (search mode `include`).
    pub included: Vec<Stored>,
}

enum B {
    S(String),
    I(i64),
    F(f64),
}

/// Splits on commas not escaped with a backslash.
fn split_or(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut esc = false;
    for c in v.chars() {
        match (esc, c) {
            (true, c) => {
                cur.push(c);
                esc = false;
            }
            (false, '\\') => esc = true,
            (false, ',') => out.push(std::mem::take(&mut cur)),
            (false, c) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn prefix(v: &str) -> (&str, &str) {
    for p in ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"] {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
                return (p, rest);
            }
        }
    }
    ("eq", v)
}

fn bad(p: &str, v: &str) -> StoreError {
    StoreError::BadSearchValue {
        param: p.to_string(),
        value: v.to_string(),
    }
}

fn date_condition(
    col_lo: &str,
    col_hi: &str,
    p: &str,
    v: &str,
    binds: &mut Vec<B>,
) -> Result<String, StoreError> {
    let (pre, rest) = prefix(v);
    let d = DateTime::parse(rest, true).ok_or_else(|| bad(p, v))?;
    let (lo, hi) = date_range(&d).ok_or_else(|| bad(p, v))?;
    let (sql, vals): (String, Vec<i64>) = match pre {
        "eq" | "ap" => (format!("({col_lo} >= ? AND {col_hi} <= ?)"), vec![lo, hi]),
        "ne" => (
            format!("NOT ({col_lo} >= ? AND {col_hi} <= ?)"),
            vec![lo, hi],
        ),
        "lt" => (format!("{col_lo} < ?"), vec![lo]),
        "gt" => (format!("{col_hi} > ?"), vec![hi]),
        "le" => (format!("{col_lo} <= ?"), vec![hi]),
        "ge" => (format!("{col_hi} >= ?"), vec![lo]),
        "sa" => (format!("{col_lo} > ?"), vec![hi]),
        "eb" => (format!("{col_hi} < ?"), vec![lo]),
        _ => return Err(bad(p, v)),
    };
    binds.extend(vals.into_iter().map(B::I));
    Ok(sql)
}

impl Store {
    /// Searches one resource type.
    pub async fn search(&self, rt: &str, q: &SearchQuery) -> Result<SearchResult, StoreError> {
        let mut wheres: Vec<String> = vec!["r.rtype = ?".into(), "r.deleted = 0".into()];
        let mut binds: Vec<B> = vec![B::S(rt.to_string())];
        let mut ignored = Vec::new();
        if let Some(m) = q.malformed.first() {
            return Err(StoreError::BadSearchValue {
                param: m.clone(),
                value: String::new(),
            });
        }
        // The most selective kind of parameter drives the query (`r.id IN (…)`, read from its value
        // index); the others are probed per candidate (`EXISTS`, via the (rtype, id) index).
        // Without this, SQLite walked every resource of the type in `_lastUpdated` order.
        let rank = |name: &str| match self.indexer().param(rt, name).map(|sp| sp.kind) {
            Some(ParamType::Reference) => 0,
            Some(ParamType::Token | ParamType::Uri) => 1,
            Some(ParamType::String) => 2,
            Some(ParamType::Number) => 3,
            Some(ParamType::Date) => 4,
            None => 5,
        };
        let mut ordered: Vec<&SearchParamValue> = q.params.iter().collect();
        ordered.sort_by_key(|p| rank(&p.name));
        let mut driven = false;
        for p in ordered {
            if p.name == "_id" {
                let ids = split_or(&p.value);
                wheres.push(format!("r.id IN ({})", vec!["?"; ids.len()].join(", ")));
                binds.extend(ids.into_iter().map(B::S));
                continue;
            }
            if p.name == "_lastUpdated" {
                let mut ors = Vec::new();
                for v in split_or(&p.value) {
                    ors.push(date_condition(
                        "r.lu_ms", "r.lu_ms", &p.name, &v, &mut binds,
                    )?);
                }
                wheres.push(format!("({})", ors.join(" OR ")));
                continue;
            }
            let Some(sp) = self.indexer().param(rt, &p.name) else {
                if q.strict {
                    return Err(StoreError::UnknownParameter(p.name.clone()));
                }
                ignored.push(p.name.clone());
                continue;
            };
            let table = match sp.kind {
                ParamType::Token => "idx_token",
                ParamType::String => "idx_string",
                ParamType::Date => "idx_date",
                ParamType::Reference => "idx_reference",
                ParamType::Number => "idx_number",
                ParamType::Uri => "idx_uri",
            };
            // `r.id IN (subquery)` lets the planner start from the index on (rtype, param, value)
            // instead of probing the index once per resource of the type.
            let exists = format!("SELECT x.id FROM {table} x WHERE x.rtype = ? AND x.param = ?");
            if p.modifier.as_deref() == Some("missing") {
                let missing = p.value == "true";
                wheres.push(format!(
                    "r.id {}IN ({exists})",
                    if missing { "NOT " } else { "" }
                ));
                binds.push(B::S(rt.to_string()));
                binds.push(B::S(p.name.clone()));
                continue;
            }
            let mut ors = Vec::new();
            let mut vbinds = Vec::new();
            for v in split_or(&p.value) {
                let cond = match sp.kind {
                    ParamType::Token => {
                        if p.modifier.as_deref() == Some("text") {
                            return Err(bad(&p.name, ":text is not supported yet"));
                        }
                        match v.split_once('|') {
                            Some(("", code)) => {
                                vbinds.push(B::S(code.to_string()));
                                "(x.system = '' AND x.code = ?)".to_string()
                            }
                            Some((sys, "")) => {
                                vbinds.push(B::S(sys.to_string()));
                                "x.system = ?".to_string()
                            }
                            Some((sys, code)) => {
                                vbinds.push(B::S(sys.to_string()));
                                vbinds.push(B::S(code.to_string()));
                                "(x.system = ? AND x.code = ?)".to_string()
                            }
                            None => {
                                vbinds.push(B::S(v.clone()));
                                "x.code = ?".to_string()
                            }
                        }
                    }
                    ParamType::String => match p.modifier.as_deref() {
                        Some("exact") => {
                            vbinds.push(B::S(v.clone()));
                            "x.exact = ?".to_string()
                        }
                        Some("contains") => {
                            vbinds.push(B::S(format!("%{}%", like_escape(&normalise(&v)))));
                            "x.norm LIKE ? ESCAPE '\\'".to_string()
                        }
                        None => {
                            vbinds.push(B::S(format!("{}%", like_escape(&normalise(&v)))));
                            "x.norm LIKE ? ESCAPE '\\'".to_string()
                        }
                        Some(m) => return Err(bad(&p.name, &format!(":{m}"))),
                    },
                    ParamType::Date => {
                        let mut b = Vec::new();
                        let c = date_condition("x.lo", "x.hi", &p.name, &v, &mut b)?;
                        vbinds.extend(b);
                        c
                    }
                    ParamType::Reference => {
                        if p.modifier.as_deref() == Some("identifier") {
                            return Err(bad(&p.name, ":identifier is not supported yet"));
                        }
                        let mut parts = v.rsplit('/');
                        match (parts.next(), parts.next()) {
                            (Some(id), Some(t)) => {
                                vbinds.push(B::S(t.to_string()));
                                vbinds.push(B::S(id.to_string()));
                                "(x.ttype = ? AND x.tid = ?)".to_string()
                            }
                            _ => {
                                vbinds.push(B::S(v.clone()));
                                "x.tid = ?".to_string()
                            }
                        }
                    }
                    ParamType::Number => {
                        let (pre, rest) = prefix(&v);
                        let n: f64 = rest.parse().map_err(|_| bad(&p.name, &v))?;
                        let places = rest.split('.').nth(1).map(str::len).unwrap_or(0) as i32;
                        let half = 0.5 * 10f64.powi(-places);
                        match pre {
                            "eq" | "ap" => {
                                vbinds.push(B::F(n - half));
                                vbinds.push(B::F(n + half));
                                "(x.val >= ? AND x.val < ?)".to_string()
                            }
                            "ne" => {
                                vbinds.push(B::F(n - half));
                                vbinds.push(B::F(n + half));
                                "NOT (x.val >= ? AND x.val < ?)".to_string()
                            }
                            op => {
                                vbinds.push(B::F(n));
                                let sym = match op {
                                    "lt" | "eb" => "<",
                                    "gt" | "sa" => ">",
                                    "le" => "<=",
                                    _ => ">=",
                                };
                                format!("x.val {sym} ?")
                            }
                        }
                    }
                    ParamType::Uri => match p.modifier.as_deref() {
                        Some("below") => {
                            vbinds.push(B::S(format!("{}%", like_escape(&v))));
                            "x.val LIKE ? ESCAPE '\\'".to_string()
                        }
                        _ => {
                            vbinds.push(B::S(v.clone()));
                            "x.val = ?".to_string()
                        }
                    },
                };
                ors.push(cond);
            }
            let not = p.modifier.as_deref() == Some("not");
            if !driven && !not {
                driven = true;
                wheres.push(format!("r.id IN ({exists} AND ({}))", ors.join(" OR ")));
                binds.push(B::S(rt.to_string()));
            } else {
                wheres.push(format!(
                    "{}EXISTS (SELECT 1 FROM {table} x WHERE x.rtype = r.rtype AND x.id = r.id AND x.param = ? AND ({}))",
                    if not { "NOT " } else { "" },
                    ors.join(" OR ")
                ));
            }
            binds.push(B::S(p.name.clone()));
            binds.extend(vbinds);
        }
        let where_sql = wheres.join(" AND ");
        // When a value index drives the query, sort its (few) matches instead of letting SQLite
        // walk the `_lastUpdated` index to avoid a sort (`+ 0` hides that index from ORDER BY).
        let lu = if driven && self.backend() == crate::Backend::Sqlite {
            "r.lu_ms + 0"
        } else {
            "r.lu_ms"
        };
        let order = match q.sort {
            SortKey::LastUpdated => format!("{lu} ASC, r.id ASC"),
            SortKey::LastUpdatedDesc => format!("{lu} DESC, r.id ASC"),
            SortKey::Id => "r.id ASC".to_string(),
        };
        let count_sql = self.sql(&format!(
            "SELECT COUNT(*) FROM resources r WHERE {where_sql}"
        ));
        let page_sql = self.sql(&format!("SELECT r.id, r.version, r.last_updated, r.deleted, r.body FROM resources r WHERE {where_sql} ORDER BY {order} LIMIT ? OFFSET ?"));
        fn bind_all<'q>(
            sql: &'q str,
            binds: &[B],
        ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
            let mut query = sqlx::query(sql);
            for b in binds {
                query = match b {
                    B::S(s) => query.bind(s.clone()),
                    B::I(i) => query.bind(*i),
                    B::F(f) => query.bind(*f),
                };
            }
            query
        }
        let total: i64 = bind_all(&count_sql, &binds)
            .fetch_one(self.pool())
            .await?
            .try_get(0)?;
        let rows = bind_all(&page_sql, &binds)
            .bind(q.count.clamp(0, 1000))
            .bind(q.offset.max(0))
            .fetch_all(self.pool())
            .await?;
        let mut resources = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get(0)?;
            let body: Option<String> = r.try_get(4)?;
            resources.push(Stored {
                resource_type: rt.to_string(),
                id,
                version: r.try_get(1)?,
                last_updated: r.try_get(2)?,
                deleted: false,
                resource: body
                    .map(|b| serde_json::from_str::<Value>(&b))
                    .transpose()?,
            });
        }
        let included = self
            .resolve_includes(&resources, &q.includes, &q.revincludes)
            .await?;
        Ok(SearchResult {
            total,
            resources,
            ignored,
            included,
        })
    }
}
