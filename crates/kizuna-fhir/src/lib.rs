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
