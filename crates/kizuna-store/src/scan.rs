//! Reading many resources in constant memory: pages in id order (keyset paging on the primary key),
//! bodies returned as the stored JSON text so an exporter can write them without parsing. The bulk
//! `$export` reads through here.

use sqlx::Row;

use crate::{Store, StoreError};

/// Which resources of a type a scan returns.
#[derive(Debug, Clone, Default)]
pub struct ScanFilter {
    /// Only resources changed at or after this instant (epoch ms).
    pub since_ms: Option<i64>,
    /// Only resources in some patient's compartment (or in the compartments of a Group's members).
    pub compartment: Option<CompartmentScope>,
}

/// The patients whose compartments a scan covers.
#[derive(Debug, Clone)]
pub enum CompartmentScope {
    /// Every patient.
    AllPatients,
    /// The Patients a Group lists in `member.entity`.
    GroupMembers(String),
}

/// One scanned resource: its id and its stored JSON (one line, no newline inside).
#[derive(Debug, Clone)]
pub struct ScannedRow {
    /// Id.
    pub id: String,
    /// The stored JSON text.
    pub body: String,
}

impl Store {
    /// The next page of current resources of `rt` after id `after` (empty string: from the start),
    /// at most `limit`. `None` when the type is outside the compartment the filter asks for.
    pub async fn scan_page(
        &self,
        rt: &str,
        filter: &ScanFilter,
        after: &str,
        limit: i64,
    ) -> Result<Option<Vec<ScannedRow>>, StoreError> {
        let mut sql = String::from(
            "SELECT r.id, r.body FROM resources r WHERE r.rtype = ? AND r.deleted = 0 AND r.id > ?",
        );
        let mut binds: Vec<String> = vec![rt.to_string(), after.to_string()];
        let mut since = None;
        if let Some(s) = filter.since_ms {
            sql.push_str(" AND r.lu_ms >= ?");
            since = Some(s);
        }
        const MEMBERS: &str = "SELECT g.tid FROM idx_reference g WHERE g.rtype = 'Group' AND g.id = ? AND g.param = 'member' AND g.ttype = 'Patient'";
        match (&filter.compartment, rt) {
            (None, _) | (Some(CompartmentScope::AllPatients), "Patient") => {}
            (Some(CompartmentScope::GroupMembers(g)), "Patient") => {
                sql.push_str(&format!(" AND r.id IN ({MEMBERS})"));
                binds.push(g.clone());
            }
            (Some(scope), _) => {
                let params = self.compartment().params(rt).to_vec();
                if params.is_empty() {
                    return Ok(None);
                }
                let list = vec!["?"; params.len()].join(", ");
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM idx_reference x WHERE x.rtype = r.rtype AND x.id = r.id AND x.ttype = 'Patient' AND x.param IN ({list})"
                ));
                binds.extend(params);
                if let CompartmentScope::GroupMembers(g) = scope {
                    sql.push_str(&format!(" AND x.tid IN ({MEMBERS})"));
                    binds.push(g.clone());
                }
                sql.push(')');
            }
        }
        sql.push_str(" ORDER BY r.id LIMIT ?");
        // Binds in text order: rtype, after, [since], compartment values.
        let sql = self.sql(&sql);
        let mut q = sqlx::query(&sql).bind(&binds[0]).bind(&binds[1]);
        if let Some(s) = since {
            q = q.bind(s);
        }
        for b in &binds[2..] {
            q = q.bind(b);
        }
        let rows = q.bind(limit).fetch_all(self.pool()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let body: Option<String> = r.try_get(1)?;
            out.push(ScannedRow {
                id: r.try_get(0)?,
                body: body.unwrap_or_default(),
            });
        }
        Ok(Some(out))
    }

    /// The resource types that have at least one current resource.
    pub async fn stored_types(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT rtype FROM resources WHERE deleted = 0")
            .fetch_all(self.pool())
            .await?;
        let mut out: Vec<String> = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
        out.sort();
        Ok(out)
    }
}
