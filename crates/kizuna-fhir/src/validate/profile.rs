//! StructureDefinition snapshots compiled into trees the validator can walk quickly: children, slices,
//! types, fixed and pattern values, bindings, and invariants with their FHIRPath parsed once.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::fhirpath::FhirPath;
use crate::model::element_type_code;

/// One allowed type of an element, with the profiles it must meet.
#[derive(Debug, Clone)]
pub struct TypeRef {
    /// Type code (`Quantity`, `Patient`, `BackboneElement` …).
    pub code: String,
    /// `type.profile`: profiles the value must conform to.
    pub profiles: Vec<String>,
    /// `type.targetProfile`: for references, what they may point to.
    pub target_profiles: Vec<String>,
}

/// A value-set binding.
#[derive(Debug, Clone)]
pub struct Binding {
    /// `required`, `extensible`, `preferred` or `example`.
    pub strength: String,
    /// The value set's canonical URL.
    pub value_set: String,
}

/// An invariant.
#[derive(Debug, Clone)]
pub struct Constraint {
    /// Key (`ele-1`, `R2152` …).
    pub key: String,
    /// `error` or `warning`.
    pub error: bool,
    /// The rule in words, as the profile states it.
    pub human: String,
    /// The expression, parsed; `None` when it does not parse (reported once as a warning).
    pub expr: Option<Arc<FhirPath>>,
    /// The expression text.
    pub source: String,
}

/// How an element is sliced.
#[derive(Debug, Clone)]
pub struct Slicing {
    /// Discriminators: (type, path).
    pub discriminators: Vec<(String, String)>,
    /// `closed` slicing rejects items that match no slice.
    pub closed: bool,
}

/// One element definition with its children and slices.
#[derive(Debug, Clone, Default)]
pub struct ElDef {
    /// Element id (`Bundle.entry:patient.resource`).
    pub id: String,
    /// Element name without `[x]`.
    pub name: String,
    /// `value[x]`.
    pub choice: bool,
    /// Slice name, for slices.
    pub slice_name: Option<String>,
    /// Minimum cardinality.
    pub min: u32,
    /// Maximum cardinality (`None` for `*`).
    pub max: Option<u32>,
    /// Allowed types.
    pub types: Vec<TypeRef>,
    /// `contentReference` (an element path in the same definition).
    pub content_ref: Option<String>,
    /// `fixed[x]`.
    pub fixed: Option<Value>,
    /// `pattern[x]`.
    pub pattern: Option<Value>,
    /// Binding.
    pub binding: Option<Binding>,
    /// Invariants.
    pub constraints: Vec<Constraint>,
    /// Slicing of this element.
    pub slicing: Option<Slicing>,
    /// Child elements.
    pub children: Vec<ElDef>,
    /// Slices of this element (each with its own children).
    pub slices: Vec<ElDef>,
    /// `maxLength` for strings.
    pub max_length: Option<usize>,
    /// Whether the base element repeats (decides array or not in JSON).
    pub base_many: Option<bool>,
    /// The pattern a slice stands for (its fixed/pattern value or one implied by its descendants).
    pub implied_pattern: Option<Value>,
    /// The element's path in the base type (the id without slice names), the key of backbone types.
    pub base_path: String,
    /// Child index by JSON key (`valueQuantity` → the `value[x]` child), built at compile time.
    pub key_index: crate::DefMap<String, usize>,
    /// Children that must be checked even when absent (minimum cardinality, or slices with a minimum).
    pub required: Vec<usize>,
    /// The JSON keys this element may appear under, with their `_key` and type (`valueQuantity` …).
    pub json_keys: Vec<(String, String, String)>,
}

impl ElDef {
    /// Finds a child definition by name.
    pub fn child(&self, name: &str) -> Option<&ElDef> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The element's name as its path spells it: `value[x]` for a choice.
    pub fn name_in_path(&self) -> String {
        if self.choice {
            format!("{}[x]", self.name)
        } else {
            self.name.clone()
        }
    }

    /// True when the value may hold `code` (after choice resolution).
    pub fn allows_type(&self, code: &str) -> bool {
        self.types.iter().any(|t| t.code == code)
    }
}

/// A compiled profile.
#[derive(Debug)]
pub struct Profile {
    /// Canonical URL.
    pub url: String,
    /// Version, when stated.
    pub version: Option<String>,
    /// The constrained type (`Bundle`, `Extension` …).
    pub type_name: String,
    /// `kind` of the definition.
    pub kind: String,
    /// The root element.
    pub root: ElDef,
    /// Elements by path, for `contentReference`.
    pub by_path: crate::DefMap<String, ElDef>,
    /// The canonical URLs of its `baseDefinition` chain, nearest first. A profile can only
    /// constrain its base, so what conforms to this profile conforms to each of these: the
    /// validator need not check an instance against both.
    pub ancestors: Vec<String>,
    /// For an Extension definition, its root's `isModifier`: it must then be sent as
    /// `modifierExtension`, and only then.
    pub is_modifier: bool,
    /// For an Extension definition, the `element` contexts it may be placed on (paths and type
    /// names). `None` where it may go anywhere: no `context`, `Element`, or a context of another
    /// kind (not checked).
    pub contexts: Option<Vec<String>>,
}

impl Profile {
    /// True when this profile is `url` (version ignored) or derives from it.
    pub fn covers(&self, url: &str) -> bool {
        let url = url.split('|').next().unwrap_or(url);
        self.url == url || self.ancestors.iter().any(|a| a == url)
    }
}

fn value_with_prefix(el: &Value, prefix: &str) -> Option<Value> {
    el.as_object()?
        .iter()
        .find(|(k, _)| {
            k.starts_with(prefix)
                && k.len() > prefix.len()
                && k.as_bytes()[prefix.len()].is_ascii_uppercase()
        })
        .map(|(_, v)| v.clone())
}

fn parse_el(el: &Value) -> ElDef {
    let s = |k: &str| el.get(k).and_then(Value::as_str);
    let path = s("path").unwrap_or("");
    let id = s("id").unwrap_or(path).to_string();
    let last = path.rsplit('.').next().unwrap_or(path);
    let types = el
        .get("type")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    let list = |k: &str| -> Vec<String> {
                        t.get(k)
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .map(str::to_string)
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    TypeRef {
                        code: element_type_code(t),
                        profiles: list("profile"),
                        target_profiles: list("targetProfile"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let constraints = el
        .get("constraint")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    let source = c.get("expression").and_then(Value::as_str)?.to_string();
                    let key = c
                        .get("key")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    Some(Constraint {
                        error: c.get("severity").and_then(Value::as_str) != Some("warning"),
                        human: c
                            .get("human")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        expr: FhirPath::parse(&source).ok().map(Arc::new),
                        key,
                        source,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let slicing = el.get("slicing").map(|sl| Slicing {
        discriminators: sl
            .get("discriminator")
            .and_then(Value::as_array)
            .map(|ds| {
                ds.iter()
                    .map(|d| {
                        (
                            d.get("type")
                                .and_then(Value::as_str)
                                .unwrap_or("value")
                                .to_string(),
                            d.get("path")
                                .and_then(Value::as_str)
                                .unwrap_or("$this")
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        closed: sl.get("rules").and_then(Value::as_str) == Some("closed"),
    });
    let mut d = ElDef {
        id,
        name: last.trim_end_matches("[x]").to_string(),
        choice: last.ends_with("[x]"),
        slice_name: s("sliceName").map(str::to_string),
        min: el.get("min").and_then(Value::as_u64).unwrap_or(0) as u32,
        max: match s("max") {
            Some("*") | None => None,
            Some(m) => m.parse().ok(),
        },
        types,
        content_ref: s("contentReference").map(|c| c.rsplit('#').next().unwrap_or(c).to_string()),
        fixed: value_with_prefix(el, "fixed"),
        pattern: value_with_prefix(el, "pattern"),
        binding: el.get("binding").and_then(|b| {
            Some(Binding {
                strength: b
                    .get("strength")
                    .and_then(Value::as_str)
                    .unwrap_or("example")
                    .to_string(),
                value_set: b.get("valueSet").and_then(Value::as_str)?.to_string(),
            })
        }),
        constraints,
        slicing,
        max_length: el
            .get("maxLength")
            .and_then(Value::as_u64)
            .map(|n| n as usize),
        base_many: el
            .pointer("/base/max")
            .and_then(Value::as_str)
            .map(|m| m != "1" && m != "0"),
        ..ElDef::default()
    };
    d.json_keys = json_keys(&d);
    d.base_path =
        d.id.split('.')
            .map(|seg| seg.split(':').next().unwrap_or(seg))
            .collect::<Vec<_>>()
            .join(".");
    d
}

fn json_keys(d: &ElDef) -> Vec<(String, String, String)> {
    if d.choice {
        d.types
            .iter()
            .map(|t| {
                let k = format!("{}{}", d.name, crate::model::choice_suffix(&t.code));
                (k.clone(), format!("_{k}"), t.code.clone())
            })
            .collect()
    } else {
        let t = d
            .types
            .first()
            .map(|t| t.code.clone())
            .unwrap_or_else(|| "BackboneElement".into());
        vec![(d.name.clone(), format!("_{}", d.name), t)]
    }
}

/// Splits an element id into segments at dots outside slice names that contain URLs.
fn id_segments(id: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = id.as_bytes();
    let mut in_slice = false;
    for i in 0..b.len() {
        match b[i] {
            b':' => in_slice = true,
            b'.' if !in_slice || !id[start..i].contains("//") => {
                out.push(&id[start..i]);
                start = i + 1;
                in_slice = false;
            }
            _ => {}
        }
    }
    out.push(&id[start..]);
    out
}

/// Compiles a StructureDefinition's snapshot. `None` without a snapshot.
pub fn compile(sd: &Value) -> Option<Profile> {
    let elements = sd.pointer("/snapshot/element")?.as_array()?;
    let mut defs: Vec<ElDef> = elements.iter().map(parse_el).collect();
    if defs.is_empty() {
        return None;
    }
    // Arena indices: parent of each element, and whether it attaches as a slice.
    let index: HashMap<String, usize> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.clone(), i))
        .collect();
    let mut attach: Vec<Option<(usize, bool)>> = vec![None; defs.len()];
    for (i, d) in defs.iter().enumerate().skip(1) {
        let segs = id_segments(&d.id);
        let last = segs.last().copied().unwrap_or("");
        if let Some((base, _slice)) = last.split_once(':') {
            // A slice (or a choice-type slice) of the element without the slice suffix.
            let mut base_id = segs[..segs.len() - 1].join(".");
            if !base_id.is_empty() {
                base_id.push('.');
            }
            base_id.push_str(base);
            if let Some(&p) = index.get(&base_id) {
                attach[i] = Some((p, true));
                continue;
            }
        }
        let parent = segs[..segs.len() - 1].join(".");
        if let Some(&p) = index.get(&parent) {
            attach[i] = Some((p, false));
        }
    }
    let mut by_path = HashMap::new();
    for d in &defs {
        if d.slice_name.is_none() && !d.id.contains(':') {
            let path = d.id.clone();
            by_path.insert(
                path,
                ElDef {
                    children: Vec::new(),
                    slices: Vec::new(),
                    ..d.clone()
                },
            );
        }
    }
    // Attach children bottom-up so each subtree is complete when moved into its parent.
    for i in (1..defs.len()).rev() {
        if let Some((p, is_slice)) = attach[i] {
            let child = std::mem::take(&mut defs[i]);
            if is_slice {
                defs[p].slices.insert(0, child);
            } else {
                defs[p].children.insert(0, child);
            }
        }
    }
    let mut root = std::mem::take(&mut defs[0]);
    merge_slices(&mut root);
    fill_patterns(&mut root);
    fill_indexes(&mut root);
    // Re-fill by_path with full subtrees for contentReference targets.
    let mut full = crate::DefMap::default();
    fn collect(d: &ElDef, out: &mut crate::DefMap<String, ElDef>, wanted: &HashMap<String, ElDef>) {
        if d.slice_name.is_none() && wanted.contains_key(&d.id) && !d.children.is_empty() {
            out.insert(d.id.clone(), d.clone());
        }
        for c in &d.children {
            collect(c, out, wanted);
        }
    }
    let targets: HashMap<String, ElDef> = root_content_refs(&root)
        .into_iter()
        .filter_map(|p| by_path.get(&p).map(|d| (p, d.clone())))
        .collect();
    collect(&root, &mut full, &targets);
    let s = |k: &str| sd.get(k).and_then(Value::as_str).map(str::to_string);
    Some(Profile {
        url: s("url").unwrap_or_default(),
        version: s("version"),
        type_name: s("type").unwrap_or_default(),
        kind: s("kind").unwrap_or_default(),
        root,
        by_path: full,
        ancestors: Vec::new(),
        is_modifier: sd
            .pointer("/snapshot/element/0/isModifier")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        contexts: element_contexts(sd),
    })
}

/// The `element` contexts of an extension definition; `None` when any context lets it go
/// anywhere (see [`Profile::contexts`]).
fn element_contexts(sd: &Value) -> Option<Vec<String>> {
    let mut allowed = Vec::new();
    for c in sd.get("context")?.as_array()? {
        let kind = c.get("type").and_then(Value::as_str).unwrap_or("");
        let expr = c.get("expression").and_then(Value::as_str)?;
        if kind != "element" || expr == "Element" {
            return None;
        }
        allowed.push(expr.to_string());
    }
    Some(allowed)
}

/// Gives every slice the base element's children and types when it does not restate them, once at
/// compile time, so validation never copies definitions.
fn merge_slices(d: &mut ElDef) {
    for c in &mut d.children {
        merge_slices(c);
    }
    let base_children = d.children.clone();
    let base_types = d.types.clone();
    for s in &mut d.slices {
        if s.children.is_empty() {
            s.children = base_children.clone();
        }
        if s.types.is_empty() {
            s.types = base_types.clone();
            s.json_keys = json_keys(s);
        }
        merge_slices(s);
    }
}

fn fill_indexes(d: &mut ElDef) {
    for c in d.children.iter_mut().chain(d.slices.iter_mut()) {
        fill_indexes(c);
    }
    d.key_index = crate::DefMap::default();
    d.required = Vec::new();
    for (i, c) in d.children.iter().enumerate() {
        for (k, _, _) in &c.json_keys {
            d.key_index.entry(k.clone()).or_insert(i);
        }
        if c.min > 0 || c.slices.iter().any(|s| s.min > 0) {
            d.required.push(i);
        }
    }
}

fn fill_patterns(d: &mut ElDef) {
    for c in d.children.iter_mut().chain(d.slices.iter_mut()) {
        fill_patterns(c);
    }
    d.implied_pattern = implied_pattern(d);
}

/// The pattern a slice stands for: its own fixed or pattern value, or one built from those of its
/// descendants (a `category` slice fixed by `coding.system` and `coding.code`).
fn implied_pattern(d: &ElDef) -> Option<Value> {
    if let Some(v) = d.fixed.as_ref().or(d.pattern.as_ref()) {
        return Some(v.clone());
    }
    let mut obj = serde_json::Map::new();
    for c in &d.children {
        if let Some(v) = implied_pattern(c) {
            let key = if c.choice {
                match c.types.first() {
                    Some(t) => format!("{}{}", c.name, crate::model::choice_suffix(&t.code)),
                    None => continue,
                }
            } else {
                c.name.clone()
            };
            let many = c.base_many.unwrap_or(c.max != Some(1));
            obj.insert(key, if many { Value::Array(vec![v]) } else { v });
        }
    }
    if obj.is_empty() {
        None
    } else {
        Some(Value::Object(obj))
    }
}

fn root_content_refs(d: &ElDef) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = &d.content_ref {
        out.push(c.clone());
    }
    for c in d.children.iter().chain(d.slices.iter()) {
        out.extend(root_content_refs(c));
    }
    out
}
