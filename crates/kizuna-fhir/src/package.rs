//! FHIR NPM packages (`.tgz`) and the base R4 definitions, gathered into one registry keyed by canonical URL.
//!
//! The registry is what makes profiles data: the validator, FHIRPath `conformsTo`, terminology and search
//! all resolve definitions here by `url` or `url|version`.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::model::TypeModel;

/// Why a package or definition file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The archive or gzip stream is damaged.
    #[error("パッケージを読めません / cannot read package: {0}")]
    Io(#[from] std::io::Error),
    /// A JSON file inside is not valid JSON.
    #[error("JSON が不正です / invalid JSON in {file}: {source}")]
    Json {
        /// The file inside the package.
        file: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// `package/package.json` is missing.
    #[error("package.json がありません / package.json missing")]
    NoManifest,
}

/// What a loaded package was: name, version and how many resources it brought.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackageSummary {
    /// NPM package name (`jp-eCSCLINS.r4`).
    pub name: String,
    /// Package version.
    pub version: String,
    /// Canonical base URL of the package.
    pub canonical: Option<String>,
    /// Number of conformance resources registered from it.
    pub resources: usize,
    /// Number of example instances it carries.
    pub examples: usize,
}

/// A package read from a `.tgz`: its manifest and its resources.
#[derive(Debug)]
pub struct Package {
    /// The package's name, version and counts.
    pub summary: PackageSummary,
    /// Conformance resources (those with a `url`): StructureDefinition, ValueSet, CodeSystem …
    pub definitions: Vec<Value>,
    /// Other resources in the package (examples).
    pub examples: Vec<Value>,
}

/// Resource types that are definitions, registered by canonical URL.
const DEFINITION_TYPES: &[&str] = &[
    "StructureDefinition",
    "ValueSet",
    "CodeSystem",
    "SearchParameter",
    "CompartmentDefinition",
    "OperationDefinition",
    "CapabilityStatement",
    "ConceptMap",
    "NamingSystem",
    "ImplementationGuide",
];

/// Reads an NPM FHIR package from the bytes of its `.tgz`.
pub fn read_package_tgz(bytes: &[u8]) -> Result<Package, PackageError> {
    let gz = flate2::read::GzDecoder::new(bytes);
    let mut archive = tar::Archive::new(gz);
    let mut manifest: Option<Value> = None;
    let mut definitions = Vec::new();
    let mut examples = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().to_string();
        if !path.ends_with(".json") {
            continue;
        }
        let file_name = path.rsplit('/').next().unwrap_or("").to_string();
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut buf)?;
        if file_name == "package.json" {
            manifest = Some(parse_json(&buf, &path)?);
            continue;
        }
        if file_name.starts_with('.') || path.contains("/other/") || path.contains("/openapi/") {
            continue;
        }
        let mut v = parse_json(&buf, &path)?;
        let rt = v.get("resourceType").and_then(Value::as_str).unwrap_or("");
        if DEFINITION_TYPES.contains(&rt) && v.get("url").is_some() {
            compact_definition(&mut v);
            definitions.push(v);
        } else if !rt.is_empty() {
            examples.push(v);
        }
    }
    let manifest = manifest.ok_or(PackageError::NoManifest)?;
    let s = |k: &str| manifest.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(Package {
        summary: PackageSummary {
            name: s("name").unwrap_or_default(),
            version: s("version").unwrap_or_default(),
            canonical: s("canonical").or_else(|| s("url")),
            resources: definitions.len(),
            examples: examples.len(),
        },
        definitions,
        examples,
    })
}

/// Reads a gzipped FHIR Bundle (the base definitions ship this way) and returns its entries' resources.
pub fn read_bundle_gz(bytes: &[u8], name: &str) -> Result<Vec<Value>, PackageError> {
    let mut out = Vec::new();
    each_in_bundle_gz(bytes, name, &mut |v| out.push(v))?;
    Ok(out)
}

/// Calls `f` with each resource of a gzipped Bundle, compacted ([`compact_definition`]), as it is
/// parsed: the Bundle is never held as parsed JSON (its narratives and mappings are most of it).
/// Returns how many resources there were.
pub fn each_in_bundle_gz(
    bytes: &[u8],
    name: &str,
    f: &mut dyn FnMut(Value),
) -> Result<usize, PackageError> {
    use serde::de::DeserializeSeed;
    let mut gz = flate2::read::GzDecoder::new(bytes);
    let mut buf = Vec::new();
    gz.read_to_end(&mut buf)?;
    let buf = buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&buf);
    let mut de = serde_json::Deserializer::from_slice(buf);
    let err = |source| PackageError::Json {
        file: name.to_string(),
        source,
    };
    let n = stream::BundleSeed(f).deserialize(&mut de).map_err(err)?;
    de.end().map_err(err)?;
    Ok(n)
}

/// The streaming Bundle reader behind [`each_in_bundle_gz`].
mod stream {
    use std::fmt;

    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;

    /// A Bundle: `entry` is read element by element, everything else skipped.
    pub(super) struct BundleSeed<'f>(pub(super) &'f mut dyn FnMut(Value));
    struct EntriesSeed<'f>(&'f mut dyn FnMut(Value));
    struct EntrySeed<'f>(&'f mut dyn FnMut(Value));

    impl<'de> DeserializeSeed<'de> for BundleSeed<'_> {
        type Value = usize;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for BundleSeed<'_> {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a Bundle")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while let Some(key) = map.next_key::<String>()? {
                if key == "entry" {
                    n += map.next_value_seed(EntriesSeed(&mut *self.0))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(n)
        }
    }

    impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
        type Value = usize;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for EntriesSeed<'_> {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("Bundle entries")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while let Some(found) = seq.next_element_seed(EntrySeed(&mut *self.0))? {
                n += found as usize;
            }
            Ok(n)
        }
    }

    impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
        type Value = bool;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for EntrySeed<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a Bundle entry")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut found = false;
            while let Some(key) = map.next_key::<String>()? {
                if key == "resource" {
                    let mut v: Value = map.next_value()?;
                    super::compact_definition(&mut v);
                    (self.0)(v);
                    found = true;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
}

fn parse_json(buf: &[u8], file: &str) -> Result<Value, PackageError> {
    // Some packages carry a UTF-8 byte-order mark.
    let buf = buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(buf);
    serde_json::from_slice(buf).map_err(|source| PackageError::Json {
        file: file.to_string(),
        source,
    })
}

/// Drops the parts of a definition no code path reads (narrative, mappings, differential, prose
/// written for people, XPath), to keep memory and start-up small: the definitions of a server are
/// most of its resident memory.
fn compact_definition(v: &mut Value) {
    const PROSE: &[&str] = &[
        "text",
        "description",
        "purpose",
        "copyright",
        "contact",
        "mapping",
        "xpath",
        "xpathUsage",
    ];
    if let Some(o) = v.as_object_mut() {
        for k in PROSE {
            o.remove(*k);
        }
        if o.get("resourceType").and_then(Value::as_str) == Some("StructureDefinition")
            && o.contains_key("snapshot")
        {
            o.remove("differential");
        }
        if let Some(Value::Array(els)) = o.get_mut("snapshot").and_then(|s| s.get_mut("element")) {
            for el in els {
                if let Some(eo) = el.as_object_mut() {
                    for k in [
                        "mapping",
                        "requirements",
                        "comment",
                        "alias",
                        "definition",
                        "isModifierReason",
                        "meaningWhenMissing",
                        "orderMeaning",
                        "example",
                        "short",
                    ] {
                        eo.remove(k);
                    }
                    if let Some(Value::Array(cs)) = eo.get_mut("constraint") {
                        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                            for k in ["xpath", "source", "requirements", "extension"] {
                                c.remove(k);
                            }
                        }
                    }
                }
            }
        }
        if let Some(Value::Array(cs)) = o.get_mut("concept") {
            drop_concept_definitions(cs);
        }
    }
}

/// CodeSystem concept definitions (prose), recursively through nested concepts.
fn drop_concept_definitions(cs: &mut [Value]) {
    for c in cs.iter_mut().filter_map(Value::as_object_mut) {
        c.remove("definition");
        if let Some(Value::Array(sub)) = c.get_mut("concept") {
            drop_concept_definitions(sub);
        }
    }
}

/// The vendored base R4 definitions and JP packages, compiled into the binary so a clone needs nothing else.
pub mod builtin {
    /// Base R4 resource StructureDefinitions (Bundle, gzipped).
    pub const PROFILES_RESOURCES: &[u8] = include_bytes!("../data/profiles-resources.json.gz");
    /// Base R4 data-type StructureDefinitions.
    pub const PROFILES_TYPES: &[u8] = include_bytes!("../data/profiles-types.json.gz");
    /// The extensions the R4 specification defines (`iso21090-EN-representation`,
    /// `patient-birthPlace` …): JP Core and JP-CLINS use them without defining them, so without
    /// these every such extension went unvalidated.
    pub const EXTENSION_DEFINITIONS: &[u8] =
        include_bytes!("../data/extension-definitions.json.gz");
    /// Base R4 ValueSets and CodeSystems.
    pub const VALUESETS: &[u8] = include_bytes!("../data/valuesets.json.gz");
    /// The HL7 v3 CodeSystems and ValueSets R4 binds to (`v3-ActCode`, `v3-NullFlavor` …),
    /// published beside `valuesets.json`: without them those bindings could not be checked.
    pub const V3_CODESYSTEMS: &[u8] = include_bytes!("../data/v3-codesystems.json.gz");
    /// The HL7 v2 tables R4 binds to (`v2-0203` identifier types …), likewise.
    pub const V2_TABLES: &[u8] = include_bytes!("../data/v2-tables.json.gz");
    /// Base R4 SearchParameters.
    pub const SEARCH_PARAMETERS: &[u8] = include_bytes!("../data/search-parameters.json.gz");
    /// The Patient compartment definition.
    pub const COMPARTMENT_PATIENT: &[u8] =
        include_bytes!("../data/compartmentdefinition-patient.json.gz");
    /// JP Core 1.1.2 (the `-url` variant JP-CLINS validates with).
    pub const JP_CORE: &[u8] = include_bytes!("../data/jp-core.r4-1.1.2-url.tgz");
    /// JP-CLINS 1.10.0 (電子カルテ情報共有サービス).
    pub const JP_CLINS: &[u8] = include_bytes!("../data/jp-eCSCLINS.r4-1.10.0-snap.tgz");
    /// eCheckupReport 1.5.0 (健診結果報告書).
    pub const JP_CHECKUP: &[u8] = include_bytes!("../data/jp-eCheckupReport.r4-1.5.0-snap.tgz");
}

/// One definition: kept as compact JSON text and parsed the first time it is asked for. A server
/// touches a few dozen of the thousands of definitions it loads; holding all of them as parsed
/// JSON took a quarter of a gigabyte.
#[derive(Debug)]
struct Definition {
    resource_type: String,
    text: Box<str>,
    parsed: OnceLock<Arc<Value>>,
}

impl Definition {
    fn new(v: &Value) -> Definition {
        Definition {
            resource_type: v
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            text: serde_json::to_string(v)
                .unwrap_or_default()
                .into_boxed_str(),
            parsed: OnceLock::new(),
        }
    }

    fn value(&self) -> &Arc<Value> {
        self.parsed.get_or_init(|| {
            // The text was written by serde_json from a Value: it parses.
            Arc::new(serde_json::from_str(&self.text).unwrap_or(Value::Null))
        })
    }
}

/// All loaded definitions, by canonical URL, plus the type model derived from the base types.
#[derive(Debug, Default)]
pub struct Registry {
    by_url: HashMap<String, Arc<Definition>>,
    /// Every version registered for a URL (packages may carry different editions of one CodeSystem).
    all_versions: HashMap<String, Vec<Arc<Definition>>>,
    model: TypeModel,
    packages: Vec<PackageSummary>,
    examples: Vec<Arc<Value>>,
}

impl Registry {
    /// The base R4 definitions plus JP Core, JP-CLINS and eCheckupReport, loaded once per process.
    pub fn builtin() -> &'static Registry {
        static REG: OnceLock<Registry> = OnceLock::new();
        REG.get_or_init(|| match Registry::load_builtin() {
            Ok(r) => r,
            Err(e) => {
                // The data is compiled in; failing here means a broken build, not bad input.
                tracing::error!(error = %e, "builtin FHIR definitions failed to load");
                Registry::default()
            }
        })
    }

    /// Loads the vendored definitions, one file and one resource at a time (a second thread for the
    /// JP packages was tried: 0.85 → 0.48 s, but 40 MB more at peak; see docs/fhir-api.md).
    pub fn load_builtin() -> Result<Registry, PackageError> {
        use builtin::*;
        // One resource at a time: parsed, compacted, fed to the type model (base types and
        // resources), then kept as text. Peak memory is one decompressed file, not its parse tree.
        let mut reg = Registry::default();
        let mut model = TypeModel::default();
        let mut base_count = 0;
        for (bytes, name, types) in [
            (PROFILES_TYPES, "profiles-types.json", true),
            (PROFILES_RESOURCES, "profiles-resources.json", true),
            (EXTENSION_DEFINITIONS, "extension-definitions.json", false),
            (VALUESETS, "valuesets.json", false),
            (V3_CODESYSTEMS, "v3-codesystems.json", false),
            (V2_TABLES, "v2-tables.json", false),
            (SEARCH_PARAMETERS, "search-parameters.json", false),
            (
                COMPARTMENT_PATIENT,
                "compartmentdefinition-patient.json",
                false,
            ),
        ] {
            base_count += each_in_bundle_gz(bytes, name, &mut |v| {
                if types {
                    model.add_structure_definition(&v);
                }
                reg.add_definition(v);
            })?;
        }
        reg.model = model;
        reg.packages.push(PackageSummary {
            name: "hl7.fhir.r4.core".into(),
            version: "4.0.1".into(),
            canonical: Some("http://hl7.org/fhir".into()),
            resources: base_count,
            examples: 0,
        });
        for p in [JP_CORE, JP_CLINS, JP_CHECKUP] {
            reg.add_package(read_package_tgz(p)?);
        }
        Ok(reg)
    }

    /// Adds a package's definitions and examples.
    pub fn add_package(&mut self, p: Package) {
        for d in p.definitions {
            self.add_definition(d);
        }
        self.examples.extend(p.examples.into_iter().map(Arc::new));
        self.packages.push(p.summary);
    }

    /// Registers one definition under `url` and `url|version`; the first one registered for a URL wins.
    pub fn add_definition(&mut self, r: Value) {
        let Some(url) = r.get("url").and_then(Value::as_str).map(str::to_string) else {
            return;
        };
        let version = r.get("version").and_then(Value::as_str).map(str::to_string);
        let r = Arc::new(Definition::new(&r));
        self.all_versions
            .entry(url.clone())
            .or_default()
            .push(r.clone());
        if let Some(v) = version {
            self.by_url
                .entry(format!("{url}|{v}"))
                .or_insert_with(|| r.clone());
        }
        self.by_url.entry(url).or_insert(r);
    }

    /// Finds a definition by canonical URL, with or without `|version`. An unknown version falls back to
    /// the unversioned URL only when no version of it matches.
    pub fn resolve(&self, canonical: &str) -> Option<&Arc<Value>> {
        if let Some(r) = self.by_url.get(canonical) {
            return Some(r.value());
        }
        let (url, _) = canonical.split_once('|')?;
        self.by_url.get(url).map(|d| d.value())
    }

    /// Every loaded version of a definition.
    pub fn versions(&self, url: &str) -> Vec<&Arc<Value>> {
        self.all_versions
            .get(url)
            .into_iter()
            .flatten()
            .map(|d| d.value())
            .collect()
    }

    /// A StructureDefinition by canonical URL or, for base types, by type name.
    pub fn structure_definition(&self, url_or_name: &str) -> Option<&Arc<Value>> {
        if url_or_name.contains('/') {
            self.resolve(url_or_name)
        } else {
            self.by_url
                .get(&format!(
                    "http://hl7.org/fhir/StructureDefinition/{url_or_name}"
                ))
                .map(|d| d.value())
        }
    }

    /// True when a definition is registered under `url` (exactly, version included if given),
    /// without parsing it: for names that come from input, which must not fill any cache.
    pub fn contains(&self, url: &str) -> bool {
        self.by_url.contains_key(url)
    }

    /// All definitions of one resource type (each once).
    pub fn definitions_of<'s>(
        &'s self,
        resource_type: &'s str,
    ) -> impl Iterator<Item = &'s Arc<Value>> + 's {
        self.by_url
            .iter()
            .filter(|(k, _)| !k.contains('|'))
            .map(|(_, v)| v)
            .filter(move |v| v.resource_type == resource_type)
            .map(|d| d.value())
    }

    /// The canonical URLs of the definitions of one resource type, without parsing them.
    pub fn urls_of<'s>(&'s self, resource_type: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.by_url
            .iter()
            .filter(|(k, _)| !k.contains('|'))
            .filter(move |(_, v)| v.resource_type == resource_type)
            .map(|(k, _)| k.as_str())
    }

    /// The type model of the base types.
    pub fn model(&self) -> &TypeModel {
        &self.model
    }

    /// The packages loaded, in load order.
    pub fn packages(&self) -> &[PackageSummary] {
        &self.packages
    }

    /// Example instances carried by the loaded packages.
    pub fn examples(&self) -> &[Arc<Value>] {
        &self.examples
    }

    /// Number of canonical URLs registered (unversioned).
    pub fn len(&self) -> usize {
        self.by_url.keys().filter(|k| !k.contains('|')).count()
    }

    /// True when nothing is loaded.
    pub fn is_empty(&self) -> bool {
        self.by_url.is_empty()
    }
}
