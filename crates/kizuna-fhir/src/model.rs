//! The shape of FHIR R4 types, derived from the base StructureDefinitions.
//!
//! FHIRPath navigation, the XML reader and the validator all need to know, for a type and an element
//! name, which types the element may hold and whether it repeats. Rather than generate Rust structs for
//! all of FHIR, this table is built at start-up from the definitions themselves, so a new FHIR package is
//! data, not code.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

/// What kind of thing a FHIR type is, as FHIRPath and the readers need to distinguish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    /// `boolean`, `string`, `date` … : JSON primitives with an optional `_name` sibling.
    Primitive,
    /// Data types such as `HumanName` and `Quantity`.
    Complex,
    /// Resources, including the abstract `Resource` and `DomainResource`.
    Resource,
    /// An anonymous nested element (`Patient.contact`), keyed by its path.
    Backbone,
}

/// One child element of a type.
#[derive(Debug, Clone)]
pub struct ElementInfo {
    /// The name without `[x]`.
    pub name: String,
    /// True for `value[x]`: the JSON key is the name plus the capitalised type.
    pub choice: bool,
    /// Type keys: a type name, or the path of a backbone element.
    pub types: Vec<String>,
    /// True when `max` is not 1 (the JSON holds an array).
    pub many: bool,
    /// For choice elements, the JSON key of each type (`valueQuantity` …), parallel to `types`.
    pub choice_keys: Vec<String>,
    /// `isSummary`: part of the `_summary=true` view.
    pub summary: bool,
    /// `min > 0`: kept in every subset view, so a subset stays a valid resource shape.
    pub required: bool,
}

/// A type with its elements.
#[derive(Debug, Clone)]
pub struct TypeInfo {
    /// The type's name (`Patient`) or, for backbones, its path (`Patient.contact`).
    pub key: String,
    /// The kind of type.
    pub kind: TypeKind,
    /// The name of the base type (`DomainResource` for `Patient`), when there is one.
    pub base: Option<String>,
    /// Elements in definition order.
    pub elements: Vec<ElementInfo>,
}

impl TypeInfo {
    /// Finds a child element by its FHIR name (without `[x]`).
    pub fn element(&self, name: &str) -> Option<&ElementInfo> {
        self.elements.iter().find(|e| e.name == name)
    }

    /// Finds the element a JSON key belongs to, returning it with the type chosen by a choice suffix.
    pub fn element_for_json_key<'s>(&'s self, key: &str) -> Option<(&'s ElementInfo, &'s str)> {
        for e in &self.elements {
            if e.choice {
                if let Some(i) = e.choice_keys.iter().position(|k| k == key) {
                    return Some((e, e.types[i].as_str()));
                }
            } else if e.name == key {
                return Some((e, e.types.first().map(String::as_str).unwrap_or("")));
            }
        }
        None
    }
}

/// The JSON suffix a type adds to a choice element (`Quantity` for `valueQuantity`, `String` for `valueString`).
pub fn choice_suffix(type_name: &str) -> String {
    let mut c = type_name.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// All FHIR types by key.
#[derive(Debug, Default)]
pub struct TypeModel {
    types: crate::DefMap<String, Arc<TypeInfo>>,
}

/// FHIR primitive type names, which in JSON are plain values.
pub const PRIMITIVES: &[&str] = &[
    "boolean",
    "integer",
    "string",
    "decimal",
    "uri",
    "url",
    "canonical",
    "base64Binary",
    "instant",
    "date",
    "dateTime",
    "time",
    "code",
    "oid",
    "id",
    "markdown",
    "unsignedInt",
    "positiveInt",
    "uuid",
    "xhtml",
];

impl TypeModel {
    /// Builds the model from base StructureDefinitions (types and resources of the core package).
    pub fn from_structure_definitions<'a>(sds: impl IntoIterator<Item = &'a Value>) -> TypeModel {
        let mut model = TypeModel::default();
        for sd in sds {
            model.add_structure_definition(sd);
        }
        model
    }

    pub(crate) fn add_structure_definition(&mut self, sd: &Value) {
        let kind_s = sd.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind_s == "logical" {
            return;
        }
        // Only the type definitions themselves, not profiles on them.
        if sd.get("derivation").and_then(Value::as_str) == Some("constraint") {
            return;
        }
        let Some(type_name) = sd.get("type").and_then(Value::as_str) else {
            return;
        };
        let kind = match kind_s {
            "primitive-type" => TypeKind::Primitive,
            "resource" => TypeKind::Resource,
            _ => TypeKind::Complex,
        };
        let base = sd
            .get("baseDefinition")
            .and_then(Value::as_str)
            .and_then(|b| b.rsplit('/').next())
            .map(str::to_string);
        let Some(elements) = sd.pointer("/snapshot/element").and_then(Value::as_array) else {
            return;
        };
        let mut owners: HashMap<String, TypeInfo> = HashMap::new();
        owners.insert(
            type_name.to_string(),
            TypeInfo {
                key: type_name.to_string(),
                kind,
                base,
                elements: Vec::new(),
            },
        );
        for el in elements.iter().skip(1) {
            let Some(path) = el.get("path").and_then(Value::as_str) else {
                continue;
            };
            let Some((parent, raw_name)) = path.rsplit_once('.') else {
                continue;
            };
            // The primitive's own `value` is the JSON value itself, not a child.
            if kind == TypeKind::Primitive && raw_name == "value" {
                continue;
            }
            let choice = raw_name.ends_with("[x]");
            let name = raw_name.trim_end_matches("[x]").to_string();
            let many = el.get("max").and_then(Value::as_str).unwrap_or("1") != "1";
            let summary = el
                .get("isSummary")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let required = el.get("min").and_then(Value::as_u64).unwrap_or(0) > 0;
            let mut types = Vec::new();
            if let Some(cr) = el.get("contentReference").and_then(Value::as_str) {
                types.push(cr.trim_start_matches('#').to_string());
            } else if let Some(ts) = el.get("type").and_then(Value::as_array) {
                for t in ts {
                    let code = element_type_code(t);
                    if (code == "BackboneElement" || code == "Element")
                        && has_children(elements, path)
                    {
                        types.push(path.to_string());
                        owners.entry(path.to_string()).or_insert_with(|| TypeInfo {
                            key: path.to_string(),
                            kind: TypeKind::Backbone,
                            base: Some(code.clone()),
                            elements: Vec::new(),
                        });
                    } else {
                        types.push(code);
                    }
                }
            }
            if let Some(owner) = owners.get_mut(parent) {
                let choice_keys = if choice {
                    types
                        .iter()
                        .map(|t| format!("{name}{}", choice_suffix(t)))
                        .collect()
                } else {
                    Vec::new()
                };
                owner.elements.push(ElementInfo {
                    name,
                    choice,
                    types,
                    many,
                    choice_keys,
                    summary,
                    required,
                });
            }
        }
        for (k, v) in owners {
            self.types.insert(k, Arc::new(v));
        }
    }

    /// Looks up a type by name or backbone path.
    pub fn get(&self, key: &str) -> Option<&Arc<TypeInfo>> {
        self.types.get(key)
    }

    /// Finds an element of a type, searching its base types too (`Patient.id` lives on `Resource`).
    pub fn element(&self, key: &str, name: &str) -> Option<&ElementInfo> {
        self.element_in(self.types.get(key)?, name)
    }

    /// [`TypeModel::element`] for a type already looked up (FHIRPath navigation has it).
    pub fn element_in<'s>(&'s self, t: &'s TypeInfo, name: &str) -> Option<&'s ElementInfo> {
        let mut cur = Some(t);
        while let Some(t) = cur {
            if let Some(e) = t.element(name) {
                return Some(e);
            }
            cur = t
                .base
                .as_deref()
                .and_then(|b| self.types.get(b))
                .map(Arc::as_ref);
        }
        None
    }

    /// Like [`TypeModel::element`], but from a JSON key (resolves choice suffixes).
    pub fn element_for_json_key(
        &self,
        key: &str,
        json_key: &str,
    ) -> Option<(&ElementInfo, String)> {
        let mut cur = self.types.get(key);
        while let Some(t) = cur {
            if let Some((e, ty)) = t.element_for_json_key(json_key) {
                return Some((e, ty.to_string()));
            }
            cur = t.base.as_deref().and_then(|b| self.types.get(b));
        }
        None
    }

    /// True when `key` is a primitive type.
    pub fn is_primitive(&self, key: &str) -> bool {
        Self::primitive(self.types.get(key).map(Arc::as_ref), key)
    }

    /// [`TypeModel::is_primitive`] for a type already looked up (`info`: its table entry, if any).
    pub fn primitive(info: Option<&TypeInfo>, key: &str) -> bool {
        // The table first: validation asks for every element, most of them complex, and a
        // table entry is never a complex type named in PRIMITIVES (tested).
        match info {
            Some(t) => t.kind == TypeKind::Primitive,
            None => PRIMITIVES.contains(&key),
        }
    }

    /// True when `key` is a resource type (concrete or abstract).
    pub fn is_resource(&self, key: &str) -> bool {
        self.types
            .get(key)
            .map(|t| t.kind == TypeKind::Resource)
            .unwrap_or(false)
    }

    /// True when `sub` is `sup` or derives from it.
    pub fn is_subtype(&self, sub: &str, sup: &str) -> bool {
        // Borrowed all the way up: FHIRPath asks this at every leading type name.
        let mut cur = Some(sub);
        for _ in 0..32 {
            let Some(c) = cur else { return false };
            if c == sup {
                return true;
            }
            cur = self.types.get(c).and_then(|t| t.base.as_deref());
        }
        false
    }

    /// The FHIR type name of a key: backbones report their base (`BackboneElement`).
    pub fn type_name<'s>(&'s self, key: &'s str) -> &'s str {
        match self.types.get(key) {
            Some(t) if t.kind == TypeKind::Backbone => {
                t.base.as_deref().unwrap_or("BackboneElement")
            }
            _ => key,
        }
    }

    /// The concrete resource types (not `Resource`, `DomainResource`), sorted: what a server serves.
    pub fn resource_types(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .types
            .iter()
            .filter(|(k, t)| {
                t.kind == TypeKind::Resource && *k != "Resource" && *k != "DomainResource"
            })
            .map(|(k, _)| k.as_str())
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of types known (for diagnostics).
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// True when no types are loaded.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}

/// The FHIR type code of an `ElementDefinition.type`, mapping FHIRPath system types to FHIR primitives.
pub fn element_type_code(t: &Value) -> String {
    let code = t.get("code").and_then(Value::as_str).unwrap_or("");
    if let Some(sys) = code.strip_prefix("http://hl7.org/fhirpath/System.") {
        // R4 marks `id`, `url` … of elements this way; the extension says the FHIR type.
        if let Some(exts) = t.get("extension").and_then(Value::as_array) {
            for e in exts {
                if e.get("url").and_then(Value::as_str)
                    == Some("http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type")
                {
                    if let Some(v) = e
                        .get("valueUrl")
                        .or_else(|| e.get("valueUri"))
                        .and_then(Value::as_str)
                    {
                        return v.to_string();
                    }
                }
            }
        }
        return match sys {
            "String" => "string",
            "Boolean" => "boolean",
            "Integer" => "integer",
            "Decimal" => "decimal",
            "Date" => "date",
            "DateTime" => "dateTime",
            "Time" => "time",
            _ => "string",
        }
        .to_string();
    }
    code.to_string()
}

fn has_children(elements: &[Value], path: &str) -> bool {
    let prefix = format!("{path}.");
    elements.iter().any(|e| {
        e.get("path")
            .and_then(Value::as_str)
            .map(|p| p.starts_with(&prefix))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod primitive_tests {
    use super::{TypeKind, PRIMITIVES};

    #[test]
    fn every_listed_primitive_in_the_table_is_a_primitive_type() {
        let model = crate::Registry::builtin().model();
        for p in PRIMITIVES {
            if let Some(t) = model.get(p) {
                assert_eq!(t.kind, TypeKind::Primitive, "{p}");
            }
            assert!(model.is_primitive(p), "{p}");
        }
        for complex in [
            "Coding",
            "Reference",
            "Patient",
            "Extension",
            "BackboneElement",
        ] {
            assert!(!model.is_primitive(complex), "{complex}");
        }
    }
}
