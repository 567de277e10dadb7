//! Terminology: is a code in a CodeSystem, is it in a ValueSet.
//!
//! Value sets are expanded from the packages on first use (explicit concepts, whole code systems,
//! `is-a` / `descendent-of` / `=` filters, nested value sets, excludes) and cached. Systems whose content is
//! not available here (LOINC, SNOMED CT, the MEDIS masters before they are imported) give
//! [`Membership::Unknown`], which the validator reports as a warning, never an error or a crash.
//!
//! The official Japanese masters that are not public (MEDIS 標準病名マスター, the YJ/HOT drug masters,
//! J-FAGY) are loaded through [`MasterImporter`] from their distribution files; the crate ships small sample
//! tables so tests and the demo run without them.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, OnceLock, RwLock};

use serde_json::Value;

use crate::package::Registry;

/// The answer to "is this code in that set".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// The code is a member.
    Member,
    /// The code is not a member.
    NotMember,
    /// Cannot tell: the system's content or the value set is not available.
    Unknown,
}

/// The codes of one code system, with parent links for hierarchy filters and properties for `=` filters.
#[derive(Debug, Default, Clone)]
pub struct CodeTable {
    /// Canonical URL of the system.
    pub system: String,
    /// code → display.
    pub codes: crate::DefMap<String, String>,
    /// code → parent codes.
    pub parents: crate::DefMap<String, Vec<String>>,
    /// (code, property) → values.
    pub properties: crate::DefMap<(String, String), Vec<String>>,
    /// True when every code of the system is listed (`content = complete`).
    pub complete: bool,
}

impl CodeTable {
    fn from_code_system(cs: &Value) -> CodeTable {
        let mut t = CodeTable {
            system: cs
                .get("url")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            complete: matches!(
                cs.get("content").and_then(Value::as_str),
                Some("complete") | None
            ),
            ..CodeTable::default()
        };
        fn walk(t: &mut CodeTable, concepts: &[Value], parent: Option<&str>) {
            for c in concepts {
                let Some(code) = c.get("code").and_then(Value::as_str) else {
                    continue;
                };
                t.codes.insert(
                    code.to_string(),
                    c.get("display")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                );
                if let Some(p) = parent {
                    t.parents
                        .entry(code.to_string())
                        .or_default()
                        .push(p.to_string());
                }
                if let Some(Value::Array(props)) = c.get("property") {
                    for p in props {
                        let Some(pc) = p.get("code").and_then(Value::as_str) else {
                            continue;
                        };
                        let val = [
                            "valueCode",
                            "valueString",
                            "valueInteger",
                            "valueBoolean",
                            "valueCoding",
                        ]
                        .iter()
                        .find_map(|k| p.get(*k))
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            Value::Object(o) => o
                                .get("code")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                            other => other.to_string(),
                        });
                        if let Some(val) = val {
                            if pc == "parent" {
                                t.parents
                                    .entry(code.to_string())
                                    .or_default()
                                    .push(val.clone());
                            }
                            t.properties
                                .entry((code.to_string(), pc.to_string()))
                                .or_default()
                                .push(val);
                        }
                    }
                }
                if let Some(Value::Array(children)) = c.get("concept") {
                    walk(t, children, Some(code));
                }
            }
        }
        if let Some(Value::Array(cs)) = cs.get("concept") {
            walk(&mut t, cs, None);
        }
        t
    }

    /// True when `code` is `ancestor` or below it.
    pub fn is_a(&self, code: &str, ancestor: &str) -> bool {
        let mut stack = vec![code.to_string()];
        let mut seen = HashSet::new();
        while let Some(c) = stack.pop() {
            if c == ancestor {
                return true;
            }
            if !seen.insert(c.clone()) {
                continue;
            }
            if let Some(ps) = self.parents.get(&c) {
                stack.extend(ps.iter().cloned());
            }
        }
        false
    }
}

/// Codes listed by a ValueSet include; hashed with foldhash like the code tables (membership is
/// checked for every coded element of every resource).
type CodeSet = HashSet<String, foldhash::fast::RandomState>;

/// What an include or exclude of a ValueSet selects from one system.
#[derive(Debug, Clone)]
enum Selector {
    All,
    Codes(CodeSet),
    Filtered(Vec<(String, String, String)>),
}

#[derive(Debug, Clone, Default)]
struct Expansion {
    includes: Vec<(String, Selector)>,
    excludes: Vec<(String, Selector)>,
    nested: Vec<String>,
    unknown: bool,
}

/// Code systems and value sets from the registry plus imported masters; the one place codes are checked.
pub struct Terminology {
    registry: &'static Registry,
    tables: RwLock<crate::DefMap<String, Arc<CodeTable>>>,
    /// Value sets expanded on first use, each in a cell of its own: threads that need the same
    /// one at the same moment wait for one expansion instead of each building it.
    expansions: RwLock<crate::DefMap<String, Arc<ExpansionCell>>>,
}

/// A value set's expansion, made on first use.
type ExpansionCell = OnceLock<Arc<Expansion>>;

/// Systems everyone uses but no package here defines: codes in them cannot be checked, only warned about.
pub const EXTERNAL_SYSTEMS: &[&str] = &[
    "http://loinc.org",
    "http://snomed.info/sct",
    "http://unitsofmeasure.org",
    "http://www.nlm.nih.gov/research/umls/rxnorm",
    "urn:ietf:bcp:47",
    "urn:ietf:bcp:13",
    "urn:iso:std:iso:3166",
];

impl Terminology {
    /// Terminology over the builtin registry, with the JLAC tables and the sample masters loaded.
    pub fn builtin() -> &'static Terminology {
        static T: OnceLock<Terminology> = OnceLock::new();
        T.get_or_init(|| {
            let t = Terminology::new(Registry::builtin());
            // The packages define the JLAC10 sets; the flat tables fill in what they lack.
            for table in crate::terminology::jlac::tables() {
                if Registry::builtin().resolve(&table.system).is_none() {
                    t.add_table(table);
                }
            }
            for table in samples::tables() {
                t.add_table(table);
            }
            t
        })
    }

    /// Terminology over a registry.
    pub fn new(registry: &'static Registry) -> Terminology {
        Terminology {
            registry,
            tables: RwLock::new(crate::DefMap::default()),
            expansions: RwLock::new(crate::DefMap::default()),
        }
    }

    /// Adds (or replaces) a code table, such as an imported master.
    pub fn add_table(&self, t: CodeTable) {
        if let Ok(mut w) = self.tables.write() {
            w.insert(t.system.clone(), Arc::new(t));
        }
        if let Ok(mut w) = self.expansions.write() {
            w.clear();
        }
    }

    /// The code table of a system: imported, or built from a CodeSystem in the registry.
    pub fn table(&self, system: &str) -> Option<Arc<CodeTable>> {
        if let Some(t) = self.tables.read().ok().and_then(|r| r.get(system).cloned()) {
            return Some(t);
        }
        let cs = self.registry.resolve(system)?;
        if cs.get("resourceType").and_then(Value::as_str) != Some("CodeSystem") {
            return None;
        }
        let mut t = CodeTable::from_code_system(cs);
        // Packages may carry different editions of one code system: accept the codes of any of them.
        for other in self.registry.versions(system).iter().skip(1) {
            let o = CodeTable::from_code_system(other);
            for (k, v) in o.codes {
                t.codes.entry(k).or_insert(v);
            }
            for (k, v) in o.parents {
                t.parents.entry(k).or_insert(v);
            }
            t.complete &= o.complete;
        }
        t.system = system.to_string();
        Some(self.remember(Arc::new(t)))
    }

    /// Keeps a table built from the registry, unless one arrived while it was built (another
    /// thread's, or an imported master from [`Terminology::add_table`], which must not be
    /// replaced by the registry's edition); answers the table kept.
    fn remember(&self, built: Arc<CodeTable>) -> Arc<CodeTable> {
        match self.tables.write() {
            Ok(mut w) => w
                .entry(built.system.clone())
                .or_insert_with(|| built.clone())
                .clone(),
            Err(_) => built,
        }
    }

    /// Is `code` defined in `system`? `Unknown` when the system is not available or not complete.
    pub fn code_in_system(&self, system: &str, code: &str) -> Membership {
        match self.table(system) {
            Some(t) if t.codes.contains_key(code) => Membership::Member,
            Some(t) if t.complete => Membership::NotMember,
            _ => Membership::Unknown,
        }
    }

    /// The display text of a code, when known.
    pub fn display(&self, system: &str, code: &str) -> Option<String> {
        self.table(system).and_then(|t| t.codes.get(code).cloned())
    }

    /// A value set's expansion. Only value sets the registry has are remembered, so URLs that
    /// come from input cannot grow the cache.
    fn expansion(&self, url: &str) -> Option<Arc<Expansion>> {
        let known = self
            .expansions
            .read()
            .ok()
            .and_then(|r| r.get(url).cloned());
        let cell = match known {
            Some(cell) => cell,
            None => {
                let vs = self.registry.resolve(url)?;
                if vs.get("resourceType").and_then(Value::as_str) != Some("ValueSet") {
                    return None;
                }
                match self.expansions.write() {
                    Ok(mut w) => w.entry(url.to_string()).or_default().clone(),
                    Err(_) => Arc::new(OnceLock::new()),
                }
            }
        };
        Some(
            cell.get_or_init(|| {
                // Unreadable: every answer from it is "unknown", never "not a member".
                let unknown = || Expansion {
                    unknown: true,
                    ..Expansion::default()
                };
                Arc::new(self.expand(url).unwrap_or_else(unknown))
            })
            .clone(),
        )
    }

    /// Builds a value set's expansion from its definition.
    fn expand(&self, url: &str) -> Option<Expansion> {
        let vs = self.registry.resolve(url)?;
        let mut exp = Expansion::default();
        let parse = |inc: &Value, exp: &mut Expansion| -> Option<(String, Selector)> {
            if let Some(Value::Array(vss)) = inc.get("valueSet") {
                exp.nested
                    .extend(vss.iter().filter_map(Value::as_str).map(str::to_string));
            }
            let system = inc.get("system").and_then(Value::as_str)?.to_string();
            if let Some(Value::Array(cs)) = inc.get("concept") {
                let codes = cs
                    .iter()
                    .filter_map(|c| c.get("code").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect();
                return Some((system, Selector::Codes(codes)));
            }
            if let Some(Value::Array(fs)) = inc.get("filter") {
                let filters = fs
                    .iter()
                    .map(|f| {
                        let g =
                            |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                        (g("property"), g("op"), g("value"))
                    })
                    .collect();
                return Some((system, Selector::Filtered(filters)));
            }
            Some((system, Selector::All))
        };
        if let Some(compose) = vs.get("compose") {
            for inc in compose
                .get("include")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(s) = parse(inc, &mut exp) {
                    exp.includes.push(s);
                }
            }
            let mut ignored = Expansion::default();
            for exc in compose
                .get("exclude")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(s) = parse(exc, &mut ignored) {
                    exp.excludes.push(s);
                }
            }
        } else if let Some(Value::Array(contains)) = vs.pointer("/expansion/contains") {
            let mut by_system: HashMap<String, CodeSet> = HashMap::new();
            fn walk(cs: &[Value], out: &mut HashMap<String, CodeSet>) {
                for c in cs {
                    if let (Some(s), Some(code)) = (
                        c.get("system").and_then(Value::as_str),
                        c.get("code").and_then(Value::as_str),
                    ) {
                        out.entry(s.to_string())
                            .or_default()
                            .insert(code.to_string());
                    }
                    if let Some(Value::Array(more)) = c.get("contains") {
                        walk(more, out);
                    }
                }
            }
            walk(contains, &mut by_system);
            exp.includes = by_system
                .into_iter()
                .map(|(s, c)| (s, Selector::Codes(c)))
                .collect();
        } else {
            exp.unknown = true;
        }
        Some(exp)
    }

    fn selects(&self, system: &str, sel: &Selector, code: &str) -> Membership {
        match sel {
            Selector::Codes(c) => {
                if c.contains(code) {
                    Membership::Member
                } else {
                    Membership::NotMember
                }
            }
            Selector::All => self.code_in_system(system, code),
            Selector::Filtered(filters) => {
                let Some(t) = self.table(system) else {
                    return Membership::Unknown;
                };
                if !t.codes.contains_key(code) {
                    return if t.complete {
                        Membership::NotMember
                    } else {
                        Membership::Unknown
                    };
                }
                for (prop, op, value) in filters {
                    let ok = match op.as_str() {
                        "is-a" => t.is_a(code, value),
                        "descendent-of" => code != value && t.is_a(code, value),
                        "is-not-a" => !t.is_a(code, value),
                        "=" => t
                            .properties
                            .get(&(code.to_string(), prop.clone()))
                            .map(|vs| vs.iter().any(|v| v == value))
                            .unwrap_or(false),
                        "in" => value.split(',').any(|v| {
                            t.properties
                                .get(&(code.to_string(), prop.clone()))
                                .map(|vs| vs.iter().any(|x| x == v.trim()))
                                .unwrap_or(false)
                        }),
                        "regex" => regex::Regex::new(&format!("^(?:{value})$"))
                            .map(|r| r.is_match(code))
                            .unwrap_or(false),
                        _ => return Membership::Unknown,
                    };
                    if !ok {
                        return Membership::NotMember;
                    }
                }
                Membership::Member
            }
        }
    }

    /// Is `(system, code)` in the value set at `url`? Without a system, any included system may match.
    pub fn validate_code(&self, url: &str, system: Option<&str>, code: &str) -> Membership {
        self.validate_code_depth(url, system, code, 0)
    }

    fn validate_code_depth(
        &self,
        url: &str,
        system: Option<&str>,
        code: &str,
        depth: usize,
    ) -> Membership {
        if depth > 16 {
            return Membership::Unknown;
        }
        let Some(exp) = self.expansion(url) else {
            return Membership::Unknown;
        };
        if exp.unknown {
            return Membership::Unknown;
        }
        for (s, sel) in &exp.excludes {
            if system.map(|x| x == s).unwrap_or(true)
                && self.selects(s, sel, code) == Membership::Member
            {
                return Membership::NotMember;
            }
        }
        let mut unknown = false;
        for (s, sel) in &exp.includes {
            if let Some(sys) = system {
                if sys != s {
                    continue;
                }
            }
            match self.selects(s, sel, code) {
                Membership::Member => return Membership::Member,
                Membership::Unknown => unknown = true,
                Membership::NotMember => {}
            }
        }
        for n in &exp.nested {
            match self.validate_code_depth(n, system, code, depth + 1) {
                Membership::Member => return Membership::Member,
                Membership::Unknown => unknown = true,
                Membership::NotMember => {}
            }
        }
        if unknown {
            Membership::Unknown
        } else {
            Membership::NotMember
        }
    }

    /// The systems a value set draws on (for messages).
    pub fn value_set_systems(&self, url: &str) -> Vec<String> {
        self.expansion(url)
            .map(|e| e.includes.iter().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default()
    }

    /// True when the value set is in the registry.
    pub fn knows_value_set(&self, url: &str) -> bool {
        self.registry
            .resolve(url)
            .map(|v| v.get("resourceType").and_then(Value::as_str) == Some("ValueSet"))
            .unwrap_or(false)
    }
}

impl crate::fhirpath::MemberOf for Terminology {
    fn member_of(&self, value_set: &str, system: Option<&str>, code: &str) -> Option<bool> {
        match self.validate_code(value_set, system, code) {
            Membership::Member => Some(true),
            Membership::NotMember => Some(false),
            Membership::Unknown => None,
        }
    }
}

/// Why a master file could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read.
    #[error("マスターを読めません / cannot read master: {0}")]
    Csv(#[from] csv::Error),
    /// A named column is not in the header.
    #[error("列がありません / column missing: {0}")]
    MissingColumn(String),
}

/// The official masters JP-CLINS codes come from, with their code-system URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterKind {
    /// MEDIS 標準病名マスター (病名管理番号).
    MedisDisease,
    /// YJ code drug master (医薬品コード).
    YjDrug,
    /// HOT9 drug master.
    Hot9Drug,
    /// J-FAGY drug allergy (YCM) codes.
    JfagyDrug,
    /// J-FAGY food allergens.
    JfagyFood,
    /// J-FAGY non-food, non-drug allergens.
    JfagyOther,
}

impl MasterKind {
    /// The code-system URL JP-CLINS uses for the master.
    pub fn system(self) -> &'static str {
        match self {
            MasterKind::MedisDisease => "http://medis.or.jp/CodeSystem/master-disease-keyNumber",
            MasterKind::YjDrug => "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code",
            MasterKind::Hot9Drug => "http://medis.or.jp/CodeSystem/master-HOT9",
            MasterKind::JfagyDrug => {
                "http://jpfhir.jp/fhir/core/CodeSystem/GCM/JP_JfagyMedicationAllergen_CS"
            }
            MasterKind::JfagyFood => {
                "http://jpfhir.jp/fhir/core/CodeSystem/JP_JfagyFoodAllergen_CS"
            }
            MasterKind::JfagyOther => {
                "http://jpfhir.jp/fhir/core/CodeSystem/JP_JfagyNonFoodNonMedicationAllergen_CS"
            }
        }
    }
}

/// Reads a master from a delimited file: which column holds the code and which the display.
///
/// The official distributions are CSV (MEDIS) or tab-separated; callers name the columns of the edition
/// they have (header names, or 0-based positions for header-less files), so a new edition is configuration.
#[derive(Debug, Clone)]
pub struct MasterImporter {
    /// Which master.
    pub kind: MasterKind,
    /// Field delimiter.
    pub delimiter: u8,
    /// Whether the first row is a header.
    pub has_header: bool,
    /// Code column: header name or position.
    pub code_column: Column,
    /// Display column: header name or position.
    pub display_column: Column,
}

/// A column by header name or by position.
#[derive(Debug, Clone)]
pub enum Column {
    /// By header name.
    Name(String),
    /// By 0-based position.
    Index(usize),
}

impl MasterImporter {
    /// Imports the whole master as a complete code table.
    pub fn import(&self, input: impl Read) -> Result<CodeTable, ImportError> {
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(self.delimiter)
            .has_headers(self.has_header)
            .flexible(true)
            .from_reader(input);
        let resolve =
            |c: &Column, headers: Option<&csv::StringRecord>| -> Result<usize, ImportError> {
                match c {
                    Column::Index(i) => Ok(*i),
                    Column::Name(n) => headers
                        .and_then(|h| h.iter().position(|x| x.trim_start_matches('\u{feff}') == n))
                        .ok_or_else(|| ImportError::MissingColumn(n.clone())),
                }
            };
        let headers = if self.has_header {
            Some(rdr.headers()?.clone())
        } else {
            None
        };
        let ci = resolve(&self.code_column, headers.as_ref())?;
        let di = resolve(&self.display_column, headers.as_ref())?;
        let mut t = CodeTable {
            system: self.kind.system().to_string(),
            complete: true,
            ..CodeTable::default()
        };
        for rec in rdr.records() {
            let rec = rec?;
            let Some(code) = rec.get(ci).map(str::trim).filter(|c| !c.is_empty()) else {
                continue;
            };
            t.codes.insert(
                code.to_string(),
                rec.get(di).unwrap_or("").trim().to_string(),
            );
        }
        Ok(t)
    }
}

/// Small sample masters of our own (not the official ones), so tests and the demo run without licences.
pub mod samples {
    use super::*;

    const MEDIS: &str = include_str!("../data/masters/sample-medis-disease.csv");
    const YJ: &str = include_str!("../data/masters/sample-yj-drug.csv");
    const JFAGY: &str = include_str!("../data/masters/sample-jfagy.csv");

    /// The sample tables. They are marked incomplete: a code missing from a sample is unknown, not wrong.
    pub fn tables() -> Vec<CodeTable> {
        let imp = |kind, text: &str| {
            let mut t = MasterImporter {
                kind,
                delimiter: b',',
                has_header: true,
                code_column: Column::Name("code".into()),
                display_column: Column::Name("display".into()),
            }
            .import(text.as_bytes())
            .unwrap_or_default();
            t.system = MasterKind::system(kind).to_string();
            t.complete = false;
            t
        };
        vec![
            imp(MasterKind::MedisDisease, MEDIS),
            imp(MasterKind::YjDrug, YJ),
            imp(MasterKind::JfagyDrug, JFAGY),
        ]
    }
}

/// The JLAC10/JLAC11 lab and infection code sets of the EHR sharing service (43 lab items, 5 infections).
pub mod jlac {
    use super::*;

    /// JLAC10 codes of the 43 core lab items.
    pub const JLAC10_CORE: &str =
        "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS";
    /// JLAC11 codes of the 43 core lab items.
    pub const JLAC11_CORE: &str =
        "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC11/JP_CLINS_ObsLabResult_CoreLabo_CS";
    /// JLAC10 codes of the 5 infection items.
    pub const JLAC10_INFECTION: &str =
        "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_InfectionLabo_CS";
    /// JLAC11 codes of the 5 infection items.
    pub const JLAC11_INFECTION: &str =
        "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC11/JP_CLINS_ObsLabResult_InfectionLabo_CS";

    const FILES: &[(&str, &str)] = &[
        (
            JLAC10_CORE,
            include_str!("../data/jlac/clins_v1.10_JLAC10_corelabo.csv"),
        ),
        (
            JLAC11_CORE,
            include_str!("../data/jlac/clins_v1.10_JLAC11_corelabo.csv"),
        ),
        (
            JLAC10_INFECTION,
            include_str!("../data/jlac/clins_v1.10_JLAC10_infectionlabo.csv"),
        ),
        (
            JLAC11_INFECTION,
            include_str!("../data/jlac/clins_v1.10_JLAC11_infectionlabo.csv"),
        ),
    ];

    /// One lab code with its item group (e.g. `TP`), names, specimen and method.
    #[derive(Debug, Clone, PartialEq)]
    pub struct LabCode {
        /// Item group (the FHIR identifying string, e.g. `TP`, `HbA1c`).
        pub item_group: String,
        /// The JLAC code.
        pub code: String,
        /// Display.
        pub display: String,
        /// Japanese name.
        pub ja_name: String,
        /// Unit, when the source gives one.
        pub unit: String,
        /// Specimen (材料).
        pub specimen: String,
        /// Method (測定法).
        pub method: String,
    }

    /// All rows of one code set.
    pub fn rows(system: &str) -> Vec<LabCode> {
        let Some((_, text)) = FILES.iter().find(|(s, _)| *s == system) else {
            return Vec::new();
        };
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        rdr.records()
            .filter_map(Result::ok)
            .map(|r| {
                let g = |i: usize| r.get(i).unwrap_or("").to_string();
                LabCode {
                    item_group: g(0),
                    code: g(1),
                    display: g(2),
                    ja_name: g(3),
                    unit: g(4),
                    specimen: g(5),
                    method: g(6),
                }
            })
            .collect()
    }

    /// The four code sets as tables with the item group as each code's parent (so `descendent-of` works).
    pub fn tables() -> Vec<CodeTable> {
        FILES
            .iter()
            .map(|(system, _)| {
                let mut t = CodeTable {
                    system: system.to_string(),
                    complete: true,
                    ..CodeTable::default()
                };
                for r in rows(system) {
                    t.codes
                        .entry(r.item_group.clone())
                        .or_insert_with(|| r.item_group.clone());
                    t.codes.insert(r.code.clone(), r.display.clone());
                    t.parents
                        .entry(r.code.clone())
                        .or_default()
                        .push(r.item_group.clone());
                }
                t
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{CodeTable, Membership, Terminology};
    use crate::Registry;
    use std::sync::Arc;

    /// A master imported while another thread builds the same system's table from the registry
    /// stays: the table built is not stored over it, and the builder answers the master too.
    #[test]
    fn an_imported_master_is_not_replaced_by_the_registry_edition() {
        let system = "http://hl7.org/fhir/administrative-gender";
        let t = Terminology::new(Registry::builtin());
        let registry_edition = CodeTable {
            system: system.into(),
            codes: [("female".into(), "Female".into())].into_iter().collect(),
            parents: Default::default(),
            properties: Default::default(),
            complete: true,
        };
        // The interleaving: the builder has its table, the import lands, the builder stores.
        t.add_table(CodeTable {
            system: system.into(),
            codes: [("robot".into(), "Robot".into())].into_iter().collect(),
            parents: Default::default(),
            properties: Default::default(),
            complete: true,
        });
        let kept = t.remember(Arc::new(registry_edition));
        assert!(
            kept.codes.contains_key("robot"),
            "the builder answers the master"
        );
        assert_eq!(t.code_in_system(system, "robot"), Membership::Member);
        assert_eq!(t.code_in_system(system, "female"), Membership::NotMember);
        // Without an import, the registry's edition is built and kept once.
        let fresh = Terminology::new(Registry::builtin());
        let a = fresh.table(system).unwrap_or_else(|| panic!("{system}"));
        let b = fresh.table(system).unwrap_or_else(|| panic!("{system}"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(fresh.code_in_system(system, "female"), Membership::Member);
    }

    /// A value set is expanded once however many threads need it at the same moment, and value-set
    /// URLs the registry lacks are not remembered.
    #[test]
    fn expansions_are_built_once_and_unknown_urls_not_kept() {
        let t = Terminology::new(Registry::builtin());
        let cached = || t.expansions.read().map(|m| m.len()).unwrap_or(usize::MAX);
        for i in 0..100 {
            let url = format!("http://example.jp/fhir/ValueSet/unknown-{i}");
            assert_eq!(t.validate_code(&url, None, "x"), Membership::Unknown);
        }
        assert_eq!(cached(), 0);
        let url = "http://hl7.org/fhir/ValueSet/administrative-gender";
        let got: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| t.expansion(url))).collect();
            handles
                .into_iter()
                .map(|h| h.join().ok().flatten())
                .collect()
        });
        let first = got[0].clone().unwrap_or_else(|| panic!("{url} expands"));
        assert!(got.iter().all(|e| e
            .as_ref()
            .is_some_and(|e| std::sync::Arc::ptr_eq(e, &first))));
        assert_eq!(cached(), 1);
        assert_eq!(
            t.validate_code(
                url,
                Some("http://hl7.org/fhir/administrative-gender"),
                "female"
            ),
            Membership::Member
        );
        assert_eq!(
            t.validate_code(
                url,
                Some("http://hl7.org/fhir/administrative-gender"),
                "robot"
            ),
            Membership::NotMember
        );
    }
}
