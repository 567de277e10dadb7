//! # kizuna-fhir
//!
//! The FHIR R4 foundation of kizuna: resources stay JSON (`serde_json::Value`) and everything about
//! their shape comes from the definitions themselves.
//!
//! - [`package`]: FHIR NPM packages and the base R4 definitions, in a [`Registry`] keyed by canonical URL.
//! - [`model`]: the type table (elements, choice types, cardinality) derived from StructureDefinitions.
//! - [`fhirpath`]: the FHIRPath engine used by validation, search and views.
//! - [`xml`]: FHIR XML read and written through the type table.
//! - [`validate`]: the profile validator producing an [`OperationOutcome`](outcome::OperationOutcome).
//! - [`terminology`]: CodeSystem/ValueSet membership, the JLAC code sets, and importers for official masters.

pub mod conformance;
pub mod fhirpath;
pub mod json;
pub mod model;
pub mod outcome;
pub mod package;
pub mod prepared;
pub mod subset;
pub mod terminology;
pub mod validate;
pub mod xhtml;
pub mod xml;

pub use package::Registry;

/// A hash map keyed by names and URLs from the loaded definitions (types, profiles, element keys).
/// Validation looks these up for every element of every resource; their keys come from the
/// definitions, not from requests, so the faster foldhash replaces SipHash's flooding protection.
pub type DefMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Calls `f` with every `reference` string in a resource or part of one (contained resources
/// included): what the store's transaction and the sharing service rewrite when Bundle-local
/// references become stored or contained ones. The walk meets every key anyway, so a `reference`
/// is recognised on the way rather than looked up (SipHash) in every object.
///
/// ```
/// let mut obs = serde_json::json!({
///     "resourceType": "Observation",
///     "subject": {"reference": "urn:uuid:p"},
///     "contained": [{"resourceType": "Specimen", "id": "s", "subject": {"reference": "urn:uuid:p"}}],
///     "performer": [{"reference": "#pr"}, {"display": "reference"}],
///     "note": [{"text": "reference"}]
/// });
/// let mut seen = Vec::new();
/// kizuna_fhir::for_each_reference(&mut obs, &mut |r| {
///     seen.push(r.clone());
///     if r == "urn:uuid:p" {
///         *r = "Patient/1".into();
///     }
/// });
/// assert_eq!(seen, ["urn:uuid:p", "urn:uuid:p", "#pr"]);
/// assert_eq!(obs["contained"][0]["subject"]["reference"], "Patient/1");
/// assert_eq!(obs["subject"]["reference"], "Patient/1");
/// ```
pub fn for_each_reference(v: &mut serde_json::Value, f: &mut impl FnMut(&mut String)) {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match x {
                    Value::String(r) if k == "reference" => f(r),
                    x => for_each_reference(x, f),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| for_each_reference(x, f)),
        _ => {}
    }
}

/// A JSON object from fields whose values are moved in. `serde_json::json!` serialises every
/// interpolated value into a new one (a deep copy through the serializer): for Bundles of stored
/// resources that copying cost more than writing the response.
pub fn object<const N: usize>(fields: [(&str, serde_json::Value); N]) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}
