//! Any text as a FHIRPath expression: parsed, and when it parses, evaluated against a JP-CLINS
//! example Patient. Errors are answers; panics, hangs and runaway memory are findings.
#![no_main]

use std::sync::OnceLock;

use kizuna_fhir::fhirpath::{EvalContext, FhirPath};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn patient() -> &'static Value {
    static P: OnceLock<Value> = OnceLock::new();
    P.get_or_init(|| {
        serde_json::json!({
            "resourceType": "Patient", "id": "p1",
            "meta": {"profile": ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Patient"]},
            "identifier": [{"system": "urn:oid:1.2.392.100495.20.3.51.11318814790", "value": "00000010"}],
            "name": [{"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "IDE"}],
                      "text": "東京 太郎", "family": "東京", "given": ["太郎"]}],
            "gender": "male", "birthDate": "1970-01-01",
            "address": [{"text": "東京都千代田区", "postalCode": "100-0001", "country": "JP"}]
        })
    })
}

fuzz_target!(
    init: {
        let _ = kizuna_fhir::Registry::builtin();
        let _ = patient();
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(expr) = FhirPath::parse(text) {
            let p = patient();
            let ctx = EvalContext::new(kizuna_fhir::Registry::builtin().model()).with_resource(p);
            let _ = expr.evaluate_resource(&ctx, p);
        }
    }
);
