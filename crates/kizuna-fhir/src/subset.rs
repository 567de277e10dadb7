//! The subset views a FHIR server returns for `_summary` and `_elements`, driven by the
//! StructureDefinitions (`isSummary`, `min`), so that a client asking for less gets less — and a
//! caller can see from the `SUBSETTED` tag that what it holds is not the whole resource.

use serde_json::{Map, Value};

use crate::model::{TypeKind, TypeModel};

/// The coding system of the `SUBSETTED` tag (FHIR R4 §3.1.1.5.7).
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Which part of a resource to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubsetView {
    /// The whole resource (`_summary=false` or nothing asked).
    Full,
    /// Elements marked `isSummary`, recursively through backbone elements (`_summary=true`).
    Summary,
    /// `text`, `id`, `meta` and the mandatory top-level elements (`_summary=text`).
    Text,
    /// Everything but `text` (`_summary=data`).
    Data,
    /// The named top-level elements plus `id`, `meta` and the mandatory ones (`_elements=`).
    Elements(Vec<String>),
}

/// Why a `_summary`/`_elements` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubsetError {
    /// `_summary` other than true/false/text/data/count.
    #[error("_summary の値が不正です / _summary must be true, false, text, data or count: {0}")]
    BadSummary(String),
}

impl SubsetView {
    /// Reads `_summary` and `_elements` (a request giving both uses `_summary`, as HAPI does).
    /// `_summary=count` is the searcher's business and maps to [`SubsetView::Full`] here.
    pub fn from_params(
        summary: Option<&str>,
        elements: Option<&str>,
    ) -> Result<SubsetView, SubsetError> {
        match summary {
            Some("true") => return Ok(SubsetView::Summary),
            Some("text") => return Ok(SubsetView::Text),
            Some("data") => return Ok(SubsetView::Data),
            Some("false") | Some("count") | None => {}
            Some(other) => return Err(SubsetError::BadSummary(other.to_string())),
        }
        Ok(match elements {
            Some(list) if !list.trim().is_empty() => SubsetView::Elements(
                list.split(',')
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect(),
            ),
            _ => SubsetView::Full,
        })
    }

    /// Applies the view to one resource. Unknown keys are dropped from every view but `Full`/`Data`.
    pub fn apply(&self, model: &TypeModel, resource: &Value) -> Value {
        let Some(obj) = resource.as_object() else {
            return resource.clone();
        };
        let rt = obj
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut out = match self {
            SubsetView::Full => return resource.clone(),
            SubsetView::Data => {
                let mut o = obj.clone();
                o.remove("text");
                o.remove("_text");
                o
            }
            SubsetView::Summary => summary_of(model, rt, obj),
            SubsetView::Text => keep_top(model, rt, obj, |name| name == "text"),
            SubsetView::Elements(list) => keep_top(model, rt, obj, |name| {
                list.iter().any(|e| {
                    e == name || e.strip_prefix(rt).and_then(|r| r.strip_prefix('.')) == Some(name)
                })
            }),
        };
        out.insert("resourceType".into(), Value::String(rt.to_string()));
        mark_subsetted(&mut out);
        Value::Object(out)
    }
}

/// The base name of a JSON key: `_birthDate` → `birthDate`, `valueQuantity` → `value`.
fn element_name(
    model: &TypeModel,
    type_key: &str,
    key: &str,
) -> Option<(String, bool, bool, String)> {
    let k = key.strip_prefix('_').unwrap_or(key);
    model
        .element_for_json_key(type_key, k)
        .map(|(e, ty)| (e.name.clone(), e.summary, e.required, ty))
}

fn keep_top(
    model: &TypeModel,
    rt: &str,
    obj: &Map<String, Value>,
    wanted: impl Fn(&str) -> bool,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        let keep = match k.as_str() {
            "resourceType" | "id" | "meta" => true,
            _ => match element_name(model, rt, k) {
                Some((name, _, required, _)) => required || wanted(&name),
                None => false,
            },
        };
        if keep {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

fn summary_of(model: &TypeModel, type_key: &str, obj: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        if k == "resourceType" {
            continue;
        }
        let Some((_, summary, required, ty)) = element_name(model, type_key, k) else {
            continue;
        };
        if !(summary || required) {
            continue;
        }
        // Backbone elements carry their own summary flags; data types are kept whole.
        let backbone = model
            .get(&ty)
            .map(|t| t.kind == TypeKind::Backbone)
            .unwrap_or(false);
        let value = if backbone && !k.starts_with('_') {
            match v {
                Value::Array(items) => Value::Array(
                    items
                        .iter()
                        .map(|i| match i.as_object() {
                            Some(o) => Value::Object(summary_of(model, &ty, o)),
                            None => i.clone(),
                        })
                        .collect(),
                ),
                Value::Object(o) => Value::Object(summary_of(model, &ty, o)),
                other => other.clone(),
            }
        } else {
            v.clone()
        };
        out.insert(k.clone(), value);
    }
    out
}

fn mark_subsetted(out: &mut Map<String, Value>) {
    let meta = out
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta
        .entry("tag")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(tags) = tags.as_array_mut() {
        let present = tags
            .iter()
            .any(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == "SUBSETTED");
        if !present {
            tags.push(serde_json::json!({
                "system": SUBSETTED_SYSTEM,
                "code": "SUBSETTED",
                "display": "Resource encoded in summary mode"
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::Registry;
    use serde_json::json;

    fn obs() -> Value {
        json!({
            "resourceType": "Observation", "id": "o1",
            "meta": {"versionId": "3"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "status": "final",
            "category": [{"text": "laboratory"}],
            "code": {"text": "Hb"},
            "subject": {"reference": "Patient/p"},
            "valueQuantity": {"value": 13.2, "unit": "g/dL"},
            "note": [{"text": "free text that is not summary"}],
            "referenceRange": [{"low": {"value": 11}}],
            "component": [{"code": {"text": "a"}, "valueString": "b", "interpretation": [{"text": "H"}]}]
        })
    }

    fn tagged(v: &Value) -> bool {
        v["meta"]["tag"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["code"] == "SUBSETTED")
    }

    #[test]
    fn summary_keeps_summary_elements_and_recurses_into_backbones() {
        let m = Registry::builtin().model();
        let s = SubsetView::Summary.apply(m, &obs());
        for k in [
            "id",
            "status",
            "code",
            "subject",
            "valueQuantity",
            "component",
        ] {
            assert!(s.get(k).is_some(), "{k} missing from {s}");
        }
        for k in ["text", "note", "referenceRange"] {
            assert!(s.get(k).is_none(), "{k} kept in {s}");
        }
        // Observation.component.interpretation is not a summary element; code and value are.
        assert_eq!(s["component"][0]["code"]["text"], "a");
        assert_eq!(s["component"][0]["valueString"], "b");
        assert!(s["component"][0].get("interpretation").is_none());
        assert!(tagged(&s));
        assert_eq!(s["meta"]["versionId"], "3");
    }

    #[test]
    fn text_data_and_elements() {
        let m = Registry::builtin().model();
        let t = SubsetView::Text.apply(m, &obs());
        // status and code are mandatory (min 1), so they stay next to text.
        let mut keys: Vec<&str> = t
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["code", "id", "meta", "resourceType", "status", "text"]
        );
        let d = SubsetView::Data.apply(m, &obs());
        assert!(d.get("text").is_none() && d.get("note").is_some() && tagged(&d));
        let e = SubsetView::from_params(None, Some("value,Observation.note"))
            .unwrap_or(SubsetView::Full)
            .apply(m, &obs());
        let mut keys: Vec<&str> = e
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "code",
                "id",
                "meta",
                "note",
                "resourceType",
                "status",
                "valueQuantity"
            ]
        );
        assert_eq!(SubsetView::Full.apply(m, &obs()), obs());
        assert!(matches!(
            SubsetView::from_params(Some("yes"), None),
            Err(SubsetError::BadSummary(_))
        ));
    }
}
