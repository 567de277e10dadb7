//! Reading many resources in constant memory: pages in storage order (keyset paging on the row id),
//! bodies returned as the stored JSON text so an exporter can write them without parsing. The bulk
//! `$export` and the retention job read through here.
//!
//! Storage order, not id order: server-assigned ids follow the order of writes closely, but ids a
//! client chose (an update that creates) come in any order, and walking those fetched each body
//! from a random page of the resources table. Row ids follow the table's own layout, so a walk
//! reads it front to back whoever chose the ids; the cursor is an integer, not a string.

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

/// Where a scan stands: the next page starts after the row this was taken from.
/// `ScanCursor::default()` starts at the beginning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanCursor(i64);

/// One scanned resource: its id and its stored JSON (one line, no newline inside).
#[derive(Debug, Clone)]
pub struct ScannedRow {
    /// Id.
    pub id: String,
    /// The stored JSON text.
    pub body: String,
    /// The cursor that continues the scan after this row.
    pub cursor: ScanCursor,
}

impl Store {
    /// The next page of current resources of `rt` after `after`, at most `limit`, in storage
    /// order. A resource updated during a scan keeps its place, so a scan visits every resource
    /// that exists throughout it once. `None` when the type is outside the compartment the
    /// filter asks for.
    pub async fn scan_page(
        &self,
        rt: &str,
        filter: &ScanFilter,
        after: ScanCursor,
        limit: i64,
    ) -> Result<Option<Vec<ScannedRow>>, StoreError> {
        enum P {
            S(String),
            I(i64),
        }
        let mut sql = String::from(
            "SELECT r.rid, r.id, r.body FROM resources r WHERE r.rtype = ? AND r.deleted = 0 AND r.rid > ?",
        );
        let mut binds: Vec<P> = vec![P::S(rt.to_string()), P::I(after.0)];
        if let Some(s) = filter.since_ms {
            sql.push_str(" AND r.lu_ms >= ?");
            binds.push(P::I(s));
        }
        let members = |group: &str, binds: &mut Vec<P>| {
            binds.push(P::I(
                self.pids("Group", "member", "")
                    .first()
                    .copied()
                    .unwrap_or(-1),
            ));
            binds.push(P::S(group.to_string()));
            "SELECT g.tid FROM idx_reference g WHERE g.pid = ? AND g.ttype = 'Patient' AND g.rid = (SELECT gr.rid FROM resources gr WHERE gr.rtype = 'Group' AND gr.id = ?)"
        };
        match (&filter.compartment, rt) {
            (None, _) | (Some(CompartmentScope::AllPatients), "Patient") => {}
            (Some(CompartmentScope::GroupMembers(g)), "Patient") => {
                let m = members(g, &mut binds);
                sql.push_str(&format!(" AND r.id IN ({m})"));
            }
            (Some(scope), _) => {
                let params = self.compartment().params(rt).to_vec();
                if params.is_empty() {
                    return Ok(None);
                }
                let pids: Vec<i64> = params.iter().flat_map(|p| self.pids(rt, p, "")).collect();
                if pids.is_empty() {
                    // No resource of the type was ever indexed with a patient link.
                    return Ok(Some(Vec::new()));
                }
                let list = vec!["?"; pids.len()].join(", ");
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM idx_reference x WHERE x.rid = r.rid AND x.ttype = 'Patient' AND x.pid IN ({list})"
                ));
                binds.extend(pids.into_iter().map(P::I));
                if let CompartmentScope::GroupMembers(g) = scope {
                    let m = members(g, &mut binds);
                    sql.push_str(&format!(" AND x.tid IN ({m})"));
                }
                sql.push(')');
            }
        }
        sql.push_str(" ORDER BY r.rid LIMIT ?");
        let sql = self.sql(&sql);
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = match b {
                P::S(s) => q.bind(s),
                P::I(i) => q.bind(i),
            };
        }
        let rows = q.bind(limit).fetch_all(self.pool()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let body: Option<String> = r.try_get(2)?;
            out.push(ScannedRow {
                id: r.try_get(1)?,
                body: body.unwrap_or_default(),
                cursor: ScanCursor(r.try_get(0)?),
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
