//! The Patient compartment (from the R4 CompartmentDefinition): which resources belong to a patient,
//! found through the reference index. `Patient/$everything` and the patient-level bulk export read it.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::Row;

use crate::{Store, StoreError};

/// For each resource type in the Patient compartment, the reference parameters that make a
/// resource of that type belong to a patient (`Observation`: `subject`, `performer`).
#[derive(Debug, Clone, Default)]
pub struct PatientCompartment {
    params: BTreeMap<String, Vec<String>>,
}

impl PatientCompartment {
    /// Reads the CompartmentDefinition `http://hl7.org/fhir/CompartmentDefinition/patient`.
    pub fn from_registry(reg: &kizuna_fhir::Registry) -> PatientCompartment {
        let mut params = BTreeMap::new();
        let def = reg.resolve("http://hl7.org/fhir/CompartmentDefinition/patient");
        for r in def
            .and_then(|d| d.get("resource"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(code), Some(ps)) = (
                r.get("code").and_then(Value::as_str),
                r.get("param").and_then(Value::as_array),
            ) else {
                continue;
            };
            // `{def}` marks the Patient resource itself.
            let ps: Vec<String> = ps
                .iter()
                .filter_map(Value::as_str)
                .filter(|p| *p != "{def}")
                .map(str::to_string)
                .collect();
            if !ps.is_empty() {
                params.insert(code.to_string(), ps);
            }
        }
        PatientCompartment { params }
    }

    /// The types with members, in name order (besides Patient itself).
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    /// The parameters linking a type to the patient (empty when the type is not in the compartment).
    pub fn params(&self, rt: &str) -> &[String] {
        self.params.get(rt).map(Vec::as_slice).unwrap_or(&[])
    }
}

impl Store {
    /// Every current resource in one patient's compartment, as (type, id), sorted; `types` limits
    /// the types, `since_ms` keeps only resources changed since then. The Patient itself is included.
    pub async fn compartment_members(
        &self,
        patient_id: &str,
        types: Option<&[String]>,
        since_ms: Option<i64>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let wanted = |t: &str| types.is_none_or(|ts| ts.iter().any(|x| x == t));
        let comp = self.compartment();
        let mut out: Vec<(String, String)> = Vec::new();
        // The ids of the parameters linking each wanted type to the patient (with the rows they
        // read: `subject` holds a Patient under `patient`), so that each is one range of the
        // reference index's key (pid, tid, ttype): no index by target alone is kept for this.
        let mut pids: Vec<i64> = comp
            .types()
            .filter(|t| wanted(t))
            .flat_map(|t| comp.params(t).iter().flat_map(move |c| self.pids(t, c, "")))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        for chunk in pids.chunks(500) {
            let sql = self.sql(&format!(
                "SELECT DISTINCT r.rtype, r.id FROM idx_reference x JOIN resources r ON r.rid = x.rid \
                 WHERE x.pid IN ({}) AND x.tid = ? AND x.ttype = 'Patient' AND r.deleted = 0",
                vec!["?"; chunk.len()].join(", ")
            ));
            let mut q = sqlx::query(&sql);
            for pid in chunk {
                q = q.bind(*pid);
            }
            for r in q.bind(patient_id).fetch_all(self.pool()).await? {
                out.push((r.try_get(0)?, r.try_get(1)?));
            }
        }
        if wanted("Patient") {
            out.push(("Patient".into(), patient_id.to_string()));
        }
        out.sort();
        out.dedup();
        if let Some(since) = since_ms {
            let mut kept = Vec::with_capacity(out.len());
            for chunk in out.chunks(400) {
                let cond = vec!["(rtype = ? AND id = ?)"; chunk.len()].join(" OR ");
                let sql = self.sql(&format!(
                    "SELECT rtype, id FROM resources WHERE deleted = 0 AND lu_ms >= ? AND ({cond})"
                ));
                let mut q = sqlx::query(&sql).bind(since);
                for (t, i) in chunk {
                    q = q.bind(t).bind(i);
                }
                for r in q.fetch_all(self.pool()).await? {
                    kept.push((r.try_get(0)?, r.try_get(1)?));
                }
            }
            kept.sort();
            out = kept;
        }
        Ok(out)
    }
}
