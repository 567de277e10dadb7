//! Any bytes as a resource: JSON parsing, then the profile validator (which runs FHIRPath
//! invariants and terminology) must answer with an OperationOutcome, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let oo = kizuna_fhir::validate::Validator::builtin().validate(&v);
        let _ = oo.to_fhir();
    }
});
