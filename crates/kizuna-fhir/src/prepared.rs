//! Bundles whose resources may be stored JSON text copied in as it is.
//!
//! Answers that carry many stored resources (a search page, a clinician summary) spend most of their
//! time parsing each stored body into a tree and writing the tree out again. A [`PreparedBundle`]
//! holds the Bundle's own elements as a tree and each entry's resource either as a tree (built or
//! changed by the server) or as the stored text, and writes the text through untouched.

use serde_json::Value;

/// An entry's resource.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryResource {
    /// A tree the server built or changed.
    Tree(Value),
    /// Stored JSON text of one resource, written out as it is.
    Text(String),
}

/// One entry: `fullUrl`, `resource`, `search.mode` (each optional but the resource).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedEntry {
    /// `fullUrl`.
    pub full_url: Option<String>,
    /// `resource`.
    pub resource: EntryResource,
    /// `search.mode` (`match`, `include`, `outcome`) in a searchset.
    pub search_mode: Option<&'static str>,
}

/// A Bundle before it is written: its own elements (`resourceType`, `type`, `total`, `link` …,
/// without `entry`) and its entries.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBundle {
    /// The Bundle's elements other than `entry`; a JSON object.
    pub head: Value,
    /// The entries, in order.
    pub entries: Vec<PreparedEntry>,
}

impl PreparedBundle {
    /// The Bundle as a tree (stored texts parsed), for callers that nest or inspect it.
    pub fn into_value(self) -> Result<Value, serde_json::Error> {
        let mut entries = Vec::with_capacity(self.entries.len());
        for e in self.entries {
            let resource = match e.resource {
                EntryResource::Tree(v) => v,
                EntryResource::Text(t) => serde_json::from_str(&t)?,
            };
            let mut o = serde_json::Map::new();
            if let Some(u) = e.full_url {
                o.insert("fullUrl".into(), Value::String(u));
            }
            o.insert("resource".into(), resource);
            if let Some(m) = e.search_mode {
                o.insert("search".into(), serde_json::json!({ "mode": m }));
            }
            entries.push(Value::Object(o));
        }
        let mut b = self.head;
        if let Some(o) = b.as_object_mut() {
            o.insert("entry".into(), Value::Array(entries));
        }
        Ok(b)
    }

    /// The Bundle as JSON text; stored texts are copied in, not parsed.
    pub fn into_bytes(self) -> Result<Vec<u8>, serde_json::Error> {
        let size: usize = self
            .entries
            .iter()
            .map(|e| match &e.resource {
                EntryResource::Text(t) => t.len() + 160,
                EntryResource::Tree(_) => 4096,
            })
            .sum();
        let mut out = Vec::with_capacity(1024 + size);
        let mut head = self.head;
        if let Some(o) = head.as_object_mut() {
            o.remove("entry");
        }
        serde_json::to_writer(&mut out, &head)?;
        // Reopen the object before its closing brace; `{}` takes no comma.
        out.pop();
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(b"\"entry\":[");
        for (i, e) in self.entries.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'{');
            if let Some(u) = e.full_url {
                out.extend_from_slice(b"\"fullUrl\":");
                serde_json::to_writer(&mut out, &u)?;
                out.push(b',');
            }
            out.extend_from_slice(b"\"resource\":");
            match e.resource {
                EntryResource::Tree(v) => serde_json::to_writer(&mut out, &v)?,
                EntryResource::Text(t) => out.extend_from_slice(t.as_bytes()),
            }
            if let Some(m) = e.search_mode {
                out.extend_from_slice(b",\"search\":{\"mode\":");
                serde_json::to_writer(&mut out, m)?;
                out.push(b'}');
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        /// Written as text or as a tree, the Bundle reads back the same.
        #[test]
        fn text_and_tree_agree(
            head_keys in prop::collection::vec("[a-z]{1,4}", 0..4),
            entries in prop::collection::vec(
                (any::<bool>(), any::<bool>(), any::<bool>(), "[a-z\"\\\\é ]{0,6}", 0i64..1000),
                0..6,
            ),
        ) {
            let mut head = serde_json::Map::new();
            for k in head_keys {
                head.insert(k.clone(), json!(k));
            }
            let entries: Vec<PreparedEntry> = entries
                .into_iter()
                .map(|(url, text, search, s, n)| {
                    let r = json!({"resourceType": "Basic", "id": s, "n": n});
                    PreparedEntry {
                        full_url: url.then(|| format!("Basic/{s}")),
                        resource: if text {
                            EntryResource::Text(r.to_string())
                        } else {
                            EntryResource::Tree(r)
                        },
                        search_mode: search.then_some("match"),
                    }
                })
                .collect();
            let b = PreparedBundle { head: Value::Object(head), entries };
            let as_text: Option<Value> = b
                .clone()
                .into_bytes()
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok());
            prop_assert_eq!(as_text, b.into_value().ok());
        }
    }
}
