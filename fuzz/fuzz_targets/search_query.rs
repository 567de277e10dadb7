//! Any text as a search query string, run against an empty store: parameters, modifiers,
//! prefixes, chains and `_has` are parsed and compiled to SQL and executed. A bad query must be an
//! error naming the parameter, never a panic or a SQL syntax error.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

struct World {
    rt: tokio::runtime::Runtime,
    store: kizuna_store::Store,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        // A file: an in-memory SQLite database is refused (each connection would see its own).
        let dir = std::env::temp_dir().join(format!("kizuna-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let url = format!("sqlite://{}", dir.join("fuzz.db").display());
        let store = rt
            .block_on(kizuna_store::Store::open(
                &url,
                kizuna_fhir::Registry::builtin(),
            ))
            .unwrap_or_else(|e| panic!("{e}"));
        World { rt, store }
    })
}

fuzz_target!(
    init: {
        let _ = world();
    },
    |data: &[u8]| {
        let Some((&first, rest)) = data.split_first() else {
            return;
        };
        let types = ["Patient", "Observation", "Condition", "Bundle", "Encounter"];
        let rt = types[first as usize % types.len()];
        let pairs: Vec<(String, String)> = form_urlencoded::parse(rest)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut q = kizuna_store::SearchQuery::from_pairs(&pairs);
        q.strict = true;
        let w = world();
        if let Err(e) = w.rt.block_on(w.store.search(rt, &q)) {
            let text = e.to_string();
            assert!(
                !text.contains("syntax error") && !text.contains("no such column"),
                "{rt}?{}: {text}",
                String::from_utf8_lossy(rest)
            );
        }
    }
);
