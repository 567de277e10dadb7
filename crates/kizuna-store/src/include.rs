//! `_include` and `_revinclude` (with `:iterate`): the resources a page of search results refers to,
//! or that refer to it, found through the reference index rather than by parsing bodies again.

use std::collections::HashSet;

use sqlx::Row;

use crate::index::ParamType;
use crate::{Store, StoreError, Stored};

/// One `_include` or `_revinclude` value: `Source:param[:Target]`, `Source:*` for every reference
/// parameter of the source type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// The type holding the reference.
    pub source_type: String,
    /// The reference search parameter, or `*`.
    pub param: String,
    /// Only references to this type.
    pub target_type: Option<String>,
    /// `:iterate` — also apply to what earlier rounds included.
    pub iterate: bool,
}

impl Include {
    /// Parses the value of `_include[:iterate]` / `_revinclude[:iterate]`.
    pub fn parse(value: &str, iterate: bool) -> Option<Include> {
        let mut parts = value.split(':');
        let source_type = parts.next().filter(|s| !s.is_empty())?.to_string();
        let param = parts.next().filter(|s| !s.is_empty())?.to_string();
        let target_type = parts.next().map(str::to_string);
        if parts.next().is_some() {
            return None;
        }
        Some(Include {
            source_type,
            param,
            target_type,
            iterate,
        })
    }
}

/// How many rounds `:iterate` may run: enough for Observation → Encounter → Patient chains, bounded
/// so a reference cycle cannot loop.
const MAX_ROUNDS: usize = 4;
/// Included resources per page, so one request cannot pull the whole database.
pub const MAX_INCLUDED: usize = 1000;

impl Store {
    /// The parameter codes `inc` names: checked to be reference parameters of its source type.
    fn include_params(&self, inc: &Include) -> Result<Vec<String>, StoreError> {
        if inc.param == "*" {
            return Ok(self
                .indexer()
                .params(&inc.source_type)
                .filter(|p| p.kind == ParamType::Reference)
                .map(|p| p.code.clone())
                .collect());
        }
        match self.indexer().param(&inc.source_type, &inc.param) {
            Some(p) if p.kind == ParamType::Reference => Ok(vec![p.code.clone()]),
            _ => Err(StoreError::BadSearchValue {
                param: "_include".into(),
                value: format!("{}:{}", inc.source_type, inc.param),
            }),
        }
    }

    /// Resolves the includes for a page: returns resources not already in `matches`, each once.
    pub async fn resolve_includes(
        &self,
        matches: &[Stored],
        includes: &[Include],
        revincludes: &[Include],
    ) -> Result<Vec<Stored>, StoreError> {
        if includes.is_empty() && revincludes.is_empty() {
            return Ok(Vec::new());
        }
        // Validate every parameter before touching the database.
        let mut inc_params = Vec::new();
        for i in includes {
            inc_params.push((i, self.include_params(i)?));
        }
        let mut rev_params = Vec::new();
        for i in revincludes {
            rev_params.push((i, self.include_params(i)?));
        }
        let mut seen: HashSet<(String, String)> = matches
            .iter()
            .map(|s| (s.resource_type.clone(), s.id.clone()))
            .collect();
        let mut frontier: Vec<(String, String)> = seen.iter().cloned().collect();
        let mut out: Vec<Stored> = Vec::new();
        for round in 0..MAX_ROUNDS {
            let mut wanted: Vec<(String, String)> = Vec::new();
            for (inc, params) in &inc_params {
                if round > 0 && !inc.iterate {
                    continue;
                }
                let ids: Vec<&str> = frontier
                    .iter()
                    .filter(|(t, _)| *t == inc.source_type)
                    .map(|(_, i)| i.as_str())
                    .collect();
                for chunk in ids.chunks(500) {
                    for p in params {
                        let pids = self.pids(&inc.source_type, p, "");
                        if pids.is_empty() {
                            continue;
                        }
                        let sql = self.sql(&include_targets_sql(chunk.len(), pids.len()));
                        let mut q = sqlx::query(&sql).bind(&inc.source_type);
                        for id in chunk {
                            q = q.bind(*id);
                        }
                        for pid in pids {
                            q = q.bind(pid);
                        }
                        for row in q.fetch_all(self.pool()).await? {
                            let t: String = row.try_get(0)?;
                            let i: String = row.try_get(1)?;
                            if inc.target_type.as_deref().is_none_or(|tt| tt == t) {
                                wanted.push((t, i));
                            }
                        }
                    }
                }
            }
            for (inc, params) in &rev_params {
                if round > 0 && !inc.iterate {
                    continue;
                }
                for (target_type, ids) in group_by_type(&frontier) {
                    if inc
                        .target_type
                        .as_deref()
                        .is_some_and(|tt| tt != target_type)
                    {
                        continue;
                    }
                    for chunk in ids.chunks(500) {
                        for p in params {
                            let pids = self.pids(&inc.source_type, p, "");
                            if pids.is_empty() {
                                continue;
                            }
                            let sql = self.sql(&format!(
                                "SELECT DISTINCT r.id FROM idx_reference x JOIN resources r ON r.rid = x.rid WHERE x.pid IN ({}) AND x.ttype = ? AND x.tid IN ({})",
                                vec!["?"; pids.len()].join(", "),
                                vec!["?"; chunk.len()].join(", ")
                            ));
                            let mut q = sqlx::query(&sql);
                            for pid in pids {
                                q = q.bind(pid);
                            }
                            q = q.bind(target_type);
                            for id in chunk {
                                q = q.bind(*id);
                            }
                            for row in q.fetch_all(self.pool()).await? {
                                let i: String = row.try_get(0)?;
                                wanted.push((inc.source_type.clone(), i));
                            }
                        }
                    }
                }
            }
            wanted.retain(|k| seen.insert(k.clone()));
            if wanted.is_empty() {
                break;
            }
            wanted.truncate(MAX_INCLUDED.saturating_sub(out.len()));
            let mut next = Vec::new();
            for (t, ids) in group_by_type(&wanted) {
                for st in self.read_many(t, &ids).await? {
                    next.push((st.resource_type.clone(), st.id.clone()));
                    out.push(st);
                }
            }
            if out.len() >= MAX_INCLUDED {
                break;
            }
            frontier = next;
        }
        Ok(out)
    }

    /// Current, non-deleted versions of several resources of one type (missing ones are skipped:
    /// a reference may point outside this server).
    pub async fn read_many(&self, rt: &str, ids: &[&str]) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let sql = self.sql(&format!(
                "SELECT id, version, last_updated, deleted, body FROM resources WHERE rtype = ? AND deleted = 0 AND id IN ({}) ORDER BY id",
                vec!["?"; chunk.len()].join(", ")
            ));
            let mut q = sqlx::query(&sql).bind(rt);
            for id in chunk {
                q = q.bind(*id);
            }
            for row in q.fetch_all(self.pool()).await? {
                let id: String = row.try_get(0)?;
                out.push(crate::stored_from_offset(rt, &id, &row, 1)?);
            }
        }
        Ok(out)
    }
}

fn group_by_type(keys: &[(String, String)]) -> Vec<(&str, Vec<&str>)> {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for (t, i) in keys {
        match groups.iter_mut().find(|(gt, _)| gt == t) {
            Some((_, v)) => v.push(i),
            None => groups.push((t, vec![i])),
        }
    }
    groups
}

/// The reference targets of some resources of one type under some parameters: binds the type,
/// `ids` ids, then `pids` parameter ids. From the page's resources to their reference rows, never
/// the other way: `CROSS JOIN` fixes that order on SQLite, whose planner without statistics (a
/// reader opened during a bulk load) walked every row of the parameter instead (7–10 ms against
/// 1.3 ms at 100k resources).
fn include_targets_sql(ids: usize, pids: usize) -> String {
    format!(
        "SELECT DISTINCT x.ttype, x.tid FROM resources r CROSS JOIN idx_reference x \
         WHERE r.rtype = ? AND r.id IN ({}) AND x.rid = r.rid AND x.pid IN ({})",
        vec!["?"; ids].join(", "),
        vec!["?"; pids].join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::include_targets_sql;

    /// The plan's steps as SQLite reports them, in order.
    fn plan(sql: &str) -> Vec<String> {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for stmt in crate::schema::ddl(crate::Backend::Sqlite) {
            c.execute_batch(stmt).unwrap();
        }
        let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let unbound = vec![rusqlite::types::Null; st.parameter_count()];
        st.query_map(rusqlite::params_from_iter(unbound), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[test]
    fn include_starts_from_the_page_resources_without_statistics() {
        // A store with no `sqlite_stat1`, as a reader opened during a bulk load sees it.
        for (ids, pids) in [(1, 1), (11, 1), (50, 3)] {
            let steps = plan(&include_targets_sql(ids, pids));
            let searches: Vec<&String> = steps.iter().filter(|s| s.starts_with("SEARCH")).collect();
            assert_eq!(searches.len(), 2, "{steps:?}");
            assert!(searches[0].starts_with("SEARCH r "), "{steps:?}");
            assert!(searches[1].contains("(rid=? AND pid=?)"), "{steps:?}");
        }
    }
}
