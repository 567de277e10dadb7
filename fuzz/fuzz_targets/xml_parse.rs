//! Any text as FHIR XML: the reader answers a resource or an error; a resource it reads is written
//! back as XML and read again, and the second reading must equal the first.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        let _ = kizuna_fhir::Registry::builtin();
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let model = kizuna_fhir::Registry::builtin().model();
        if let Ok(v) = kizuna_fhir::xml::from_xml(text, model) {
            let again = kizuna_fhir::xml::to_xml(&v, model);
            let back = kizuna_fhir::xml::from_xml(&again, model);
            assert_eq!(back.ok().as_ref(), Some(&v), "XML round trip of {again}");
        }
    }
);
