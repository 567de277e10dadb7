//! Any text as an insured-person identifier (`保険者番号:記号:番号:枝番`): parsing answers an identifier
//! or an error; an identifier's own text parses back to itself.
#![no_main]

use kizuna_share::MemberId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = MemberId::parse(text) {
        let again = MemberId::parse(&m.as_text());
        assert_eq!(again.ok().as_ref(), Some(&m), "{text:?} → {}", m.as_text());
    }
});
