//! Any bytes as a resource: JSON parsing, then the profile validator (which runs FHIRPath
//! invariants and terminology) must answer with an OperationOutcome, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    // Loading the packages takes seconds in an instrumented build: done once, not in the first input's time.
    init: {
        let _ = kizuna_fhir::validate::Validator::builtin();
    },
    |data: &[u8]| {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            let oo = kizuna_fhir::validate::Validator::builtin().validate(&v);
            let _ = oo.to_fhir();
        }
    }
);
