//! The profile validator: checks a resource against the StructureDefinitions it claims (or one named by the
//! caller) and reports every problem as an [`OperationOutcome`] issue with the element's FHIRPath.
//!
//! What it checks: unknown elements, cardinality, JSON shape (array or not), types and choice types,
//! primitive formats, fixed and pattern values, slicing (value, pattern, type, profile and exists
//! discriminators; open and closed), extensions against their own definitions, bindings (required and
//! extensible) and codes in local CodeSystems, every FHIRPath invariant (including the JP-CLINS numbered
//! rules), `meta.profile` with or without version, profiles of Bundle entries, contained resources, and
//! references inside a Bundle.

mod primitive;
pub mod profile;

use std::sync::{Arc, OnceLock, RwLock};

use serde_json::{Map, Value};
use smallvec::SmallVec;

use crate::fhirpath::{ConformsTo, EvalContext, Item, Node};
use crate::json::{self, Member as _};
use crate::model::choice_suffix;
use crate::outcome::{Issue, OperationOutcome, Severity};
use crate::package::Registry;
use crate::terminology::{Membership, Terminology};
use profile::{compile, ElDef, Profile};

/// Limits how deep resources may nest (contained, Bundle in Bundle), so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 48;

/// Where the R4 specification's own extensions live.
const CORE_EXTENSIONS: &str = "http://hl7.org/fhir/StructureDefinition/";
/// The base Extension type's definition, which an extension's `url` must not name.
const EXTENSION_BASE: &str = "http://hl7.org/fhir/StructureDefinition/Extension";

/// Validates resources; holds compiled profiles, shared across threads.
pub struct Validator {
    registry: &'static Registry,
    terminology: &'static Terminology,
    /// Compiled profiles by the name they were asked for. Each has a cell of its own, so threads
    /// asking for the same profile at once wait for one compilation instead of each doing it.
    profiles: RwLock<crate::DefMap<String, Arc<ProfileCell>>>,
    structure_only: bool,
}

/// A profile compiled on first use (`None`: the definition does not compile).
type ProfileCell = OnceLock<Option<Arc<Profile>>>;

impl Validator {
    /// The validator over the builtin registry and terminology.
    pub fn builtin() -> &'static Validator {
        static V: OnceLock<Validator> = OnceLock::new();
        V.get_or_init(|| Validator::new(Registry::builtin(), Terminology::builtin()))
    }

    /// A validator over a registry and terminology.
    pub fn new(registry: &'static Registry, terminology: &'static Terminology) -> Validator {
        Validator {
            registry,
            terminology,
            profiles: RwLock::new(crate::DefMap::default()),
            structure_only: false,
        }
    }

    /// A validator that checks structure only: elements, cardinality, JSON shape, types and primitive
    /// formats, fixed and pattern values and slices, but no terminology bindings, no FHIRPath
    /// invariants and no extension definitions looked up by URL (only those a profile names). It
    /// exists to compare like with like against validators that do no more (such as pydantic
    /// models); a store should use the full validator.
    pub fn structure_only(
        registry: &'static Registry,
        terminology: &'static Terminology,
    ) -> Validator {
        Validator {
            structure_only: true,
            ..Validator::new(registry, terminology)
        }
    }

    /// The registry the validator resolves profiles in.
    pub fn registry(&self) -> &'static Registry {
        self.registry
    }

    /// A compiled profile by canonical URL (with or without `|version`), or by base type name.
    ///
    /// Only names the registry knows are remembered: `meta.profile` comes from input, and
    /// remembering every unknown URL sent would let senders grow this cache without bound.
    pub fn profile(&self, url: &str) -> Option<Arc<Profile>> {
        let known = self.profiles.read().ok().and_then(|m| m.get(url).cloned());
        let cell = match known {
            Some(cell) => cell,
            None => {
                let sd = self.registry.structure_definition(url)?;
                if sd.member("resourceType").and_then(Value::as_str) != Some("StructureDefinition")
                {
                    return None;
                }
                match self.profiles.write() {
                    Ok(mut m) => m.entry(url.to_string()).or_default().clone(),
                    Err(_) => Arc::new(OnceLock::new()),
                }
            }
        };
        cell.get_or_init(|| {
            let sd = self.registry.structure_definition(url)?;
            let mut p = compile(sd)?;
            p.ancestors = self.base_chain(sd);
            Some(Arc::new(p))
        })
        .clone()
    }

    /// The canonical URLs a definition derives from, nearest first (cycles and runaway chains stop).
    fn base_chain(&self, sd: &Value) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut next = sd.member("baseDefinition").and_then(Value::as_str);
        while let Some(b) = next {
            let canonical = b.split('|').next().unwrap_or(b).to_string();
            if out.contains(&canonical) || out.len() >= 32 {
                break;
            }
            out.push(canonical);
            next = self
                .registry
                .structure_definition(b)
                .and_then(|d| d.member("baseDefinition"))
                .and_then(Value::as_str);
        }
        out
    }

    /// Validates a resource against the profiles it claims in `meta.profile`, or its base definition.
    pub fn validate(&self, resource: &Value) -> OperationOutcome {
        self.validate_with(resource, &[])
    }

    /// Validates a resource against the given profiles (and those it claims).
    pub fn validate_with(&self, resource: &Value, profiles: &[String]) -> OperationOutcome {
        let mut run = Run {
            v: self,
            issues: Vec::new(),
            root: resource,
            container: None,
            path_bufs: Vec::new(),
            path_depth: 0,
            depth: 0,
            resource_start: 0,
        };
        let rt = resource
            .member("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !resource.is_object() {
            run.error(
                "structure",
                "",
                "リソースは JSON オブジェクトである必要があります",
                "a resource must be a JSON object",
            );
        } else if rt.is_empty() || !self.registry.model().is_resource(rt) {
            run.error(
                "structure",
                "",
                &format!("resourceType が不明です ({rt})"),
                &format!("unknown or missing resourceType ({rt})"),
            );
        } else {
            run.resource(resource, rt, profiles, rt, resource);
        }
        OperationOutcome {
            issues: without_repeats(run.issues),
        }
    }
}

/// True when the extension at `path` was sent as a `modifierExtension`.
fn sent_as_modifier(path: &str) -> bool {
    path.rsplit('.')
        .next()
        .is_some_and(|last| last.starts_with("modifierExtension"))
}

/// The resource type a literal reference names: `Type/id` or `…/Type/id`, with or without
/// `/_history/n`. `None` for a contained (`#`), `urn:` or otherwise unshaped reference.
fn literal_type(r: &str) -> Option<&str> {
    if r.starts_with('#') || r.starts_with("urn:") {
        return None;
    }
    let r = r.split("/_history/").next().unwrap_or(r);
    let r = r.split(['?', '#']).next().unwrap_or(r);
    let mut parts = r.rsplit('/');
    let (id, ty) = (parts.next()?, parts.next()?);
    let shaped = !id.is_empty()
        && ty.starts_with(|c: char| c.is_ascii_uppercase())
        && ty.chars().all(|c| c.is_ascii_alphanumeric());
    shaped.then_some(ty)
}

/// The issues with each one kept once, in first-reported order. A resource is checked against
/// every profile it claims, and where two profiles bind the same element (JP_Encounter and the
/// base Encounter on `class`) both report the same fault at the same path.
fn without_repeats(issues: Vec<Issue>) -> Vec<Issue> {
    if issues.len() < 2 {
        return issues;
    }
    let mut seen = std::collections::HashSet::with_capacity(issues.len());
    let first: Vec<bool> = issues
        .iter()
        .map(|i| seen.insert((i.severity, i.code, i.expression.as_str(), i.en.as_str())))
        .collect();
    drop(seen);
    issues
        .into_iter()
        .zip(first)
        .filter_map(|(i, first)| first.then_some(i))
        .collect()
}

impl ConformsTo for Validator {
    fn conforms_to(&self, resource: &Value, profile: &str) -> Option<bool> {
        let p = self.profile(profile)?;
        let rt = resource
            .member("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !self.registry.model().is_subtype(rt, &p.type_name) {
            return Some(false);
        }
        let mut run = Run {
            v: self,
            issues: Vec::new(),
            root: resource,
            container: None,
            path_bufs: Vec::new(),
            path_depth: 0,
            depth: 0,
            resource_start: 0,
        };
        run.against_profile(resource, &p, rt, resource);
        Some(!run.issues.iter().any(|i| i.severity <= Severity::Error))
    }
}

struct Run<'v> {
    v: &'v Validator,
    issues: Vec<Issue>,
    root: &'v Value,
    /// The resource that contains the current one, while validating a contained resource.
    container: Option<&'v Value>,
    /// Reusable path buffers, one per element depth.
    path_bufs: Vec<String>,
    path_depth: usize,
    depth: usize,
    /// Where the current resource's own path ends in an element's path (`Bundle.entry[1].resource`
    /// is 24 bytes): what follows is the element's path within that resource.
    resource_start: usize,
}

/// What [`Run::holder_names`] gathers on its way to the element holding an extension.
struct HolderWalk {
    /// The path from the resource type, in definition names (`Observation.value[x]`).
    full_path: String,
    /// The ids of the holder in the definition it belongs to.
    names: Vec<String>,
    /// The holder's type.
    ty: String,
}

fn is_resource_type(v: &Validator, ty: &str) -> bool {
    is_resource_kind(ty, v.registry.model().get(ty).map(|t| t.kind))
}

/// True when `ty`, whose entry in the type table (if any) has `kind`, is a resource type: for
/// callers that already looked the type up.
fn is_resource_kind(ty: &str, kind: Option<crate::model::TypeKind>) -> bool {
    ty == "Resource" || ty == "DomainResource" || kind == Some(crate::model::TypeKind::Resource)
}

/// True when `value` contains everything in `pattern` (FHIR pattern matching).
pub fn matches_pattern(value: &Value, pattern: &Value) -> bool {
    match (value, pattern) {
        (Value::Object(v), Value::Object(p)) => p.iter().all(|(k, pv)| {
            json::field(v, k)
                .map(|vv| matches_pattern(vv, pv))
                .unwrap_or(false)
        }),
        (Value::Array(v), Value::Array(p)) => p
            .iter()
            .all(|pi| v.iter().any(|vi| matches_pattern(vi, pi))),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// A JSON key a child definition accepts (key, `_` key, type), with the value and the `_`
/// extension object the element has under it.
type Present<'a, 'v> = (
    &'a (String, String, String),
    Option<&'v Value>,
    Option<&'v Value>,
);

/// One item of a child element: its value, its `_` extension, the chosen type, the JSON key, and
/// whether it came from an array.
type ChildItem<'v, 'd> = (&'v Value, Option<&'v Value>, &'d str, &'d str, bool);

impl<'v> Run<'v> {
    fn push(&mut self, sev: Severity, code: &'static str, path: &str, ja: &str, en: &str) {
        self.issues.push(Issue::new(sev, code, path, ja, en));
    }

    fn error(&mut self, code: &'static str, path: &str, ja: &str, en: &str) {
        self.push(Severity::Error, code, path, ja, en);
    }

    fn warn(&mut self, code: &'static str, path: &str, ja: &str, en: &str) {
        self.push(Severity::Warning, code, path, ja, en);
    }

    /// Validates a resource: against `explicit` profiles, its `meta.profile`, or its base definition.
    fn resource(
        &mut self,
        res: &'v Value,
        rt: &str,
        explicit: &[String],
        path: &str,
        _container: &'v Value,
    ) {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            self.error(
                "structure",
                path,
                "入れ子が深すぎます",
                "resources nested too deeply",
            );
            self.depth -= 1;
            return;
        }
        let outer_start = std::mem::replace(&mut self.resource_start, path.len());
        let mut urls: Vec<String> = explicit.to_vec();
        if let Some(Value::Array(ps)) = res.pointer("/meta/profile") {
            for p in ps.iter().filter_map(Value::as_str) {
                if !urls.iter().any(|u| u == p) {
                    urls.push(p.to_string());
                }
            }
        }
        let mut validated_any = false;
        let mut done: Vec<String> = Vec::new();
        // A profile that another one here derives from is checked by checking that one: a contained
        // Encounter claiming JP_Encounter_eCS in a slice typed JP_Encounter was validated twice.
        let resolved: Vec<(&String, Option<Arc<Profile>>)> =
            urls.iter().map(|u| (u, self.v.profile(u))).collect();
        for (url, found) in &resolved {
            match found {
                Some(p) => {
                    if done.contains(&p.url) {
                        continue;
                    }
                    let covered = resolved
                        .iter()
                        .filter_map(|(_, q)| q.as_ref())
                        .any(|q| q.url != p.url && q.covers(&p.url) && !p.covers(&q.url));
                    if covered {
                        continue;
                    }
                    done.push(p.url.clone());
                    if !self.v.registry.model().is_subtype(rt, &p.type_name) {
                        self.error(
                            "invalid",
                            path,
                            &format!(
                                "プロファイル {url} は {} 用で、{rt} には使えません",
                                p.type_name
                            ),
                            &format!("profile {url} is for {}, not {rt}", p.type_name),
                        );
                        continue;
                    }
                    let before = self.issues.len();
                    self.against_profile(res, p, path, res);
                    for i in &mut self.issues[before..] {
                        if i.rule.is_none() {
                            i.rule = Some(url.to_string());
                        }
                    }
                    validated_any = true;
                }
                None => self.warn(
                    "not-found",
                    &format!("{path}.meta.profile"),
                    &format!("プロファイルが見つからないため検査できません: {url}"),
                    &format!("profile not found, not checked: {url}"),
                ),
            }
        }
        if !validated_any {
            match self.v.profile(rt) {
                Some(p) => self.against_profile(res, &p, path, res),
                None => self.error(
                    "not-supported",
                    path,
                    &format!("{rt} の定義がありません"),
                    &format!("no definition for {rt}"),
                ),
            }
        }
        self.resource_start = outer_start;
        self.depth -= 1;
    }

    fn against_profile(
        &mut self,
        value: &'v Value,
        p: &Arc<Profile>,
        path: &str,
        resource: &'v Value,
    ) {
        let ty = p.type_name.clone();
        self.element(value, None, &p.root, &ty, path, resource, p);
    }

    /// Validates one element value against its definition, as type `ty`.
    #[allow(clippy::too_many_arguments)]
    fn element(
        &mut self,
        value: &'v Value,
        ext: Option<&'v Value>,
        def: &ElDef,
        ty: &str,
        path: &str,
        resource: &'v Value,
        profile: &Arc<Profile>,
    ) {
        let model = self.v.registry.model();
        // One look in the type table answers both questions for this element.
        let kind = model.get(ty).map(|t| t.kind);
        let primitive = match kind {
            Some(k) => k == crate::model::TypeKind::Primitive,
            None => crate::model::PRIMITIVES.contains(&ty),
        };
        let is_res = is_resource_kind(ty, kind);
        if primitive {
            // R4 types Resource.id as System.String, but a resource id must still be a FHIR `id`.
            let ty =
                if def.name == "id" && def.id.matches('.').count() == 1 && !def.id.contains(':') {
                    "id"
                } else {
                    ty
                };
            if !value.is_null() {
                if let Err((ja, en)) = primitive::check(ty, value) {
                    self.error("value", path, &ja, &en);
                    return;
                }
                if let (Some(max), Some(s)) = (def.max_length, value.as_str()) {
                    if s.chars().count() > max {
                        self.error(
                            "value",
                            path,
                            &format!("{max} 文字を超えています"),
                            &format!("longer than {max} characters"),
                        );
                    }
                }
            } else if ext.is_none() {
                self.error(
                    "required",
                    path,
                    "値も拡張もありません",
                    "element has neither a value nor extensions (ele-1)",
                );
            }
            if let Some(e) = ext {
                self.primitive_extensions(e, path, resource);
            }
            self.fixed_pattern(value, def, path);
            self.binding(value, def, ty, path);
            self.constraints(value, ext, def, ty, path, resource);
            return;
        }
        if is_res && !std::ptr::eq(value, resource) {
            self.nested_resource(value, def, path, resource);
            return;
        }
        let Some(obj) = value.as_object() else {
            self.error(
                "structure",
                path,
                &format!("{ty} は JSON オブジェクトである必要があります"),
                &format!("{ty} must be a JSON object"),
            );
            return;
        };
        if obj.is_empty() {
            self.error(
                "required",
                path,
                "空の要素は使えません",
                "element has no value and no children (ele-1)",
            );
            return;
        }
        // A type profile on the element (extension definitions, datatype profiles) replaces the generic children.
        let type_profile =
            def.types
                .iter()
                .find(|t| t.code == ty)
                .and_then(|t| t.profiles.first())
                .filter(|p| {
                    p.as_str() != profile.url
                        && !def.children.iter().any(|c| {
                            c.fixed.is_some() || c.pattern.is_some() || !c.slices.is_empty()
                        })
                });
        // An extension that no profile slices is checked against the definition its `url` names,
        // when that definition is loaded (as the HL7 validator does): the core extensions
        // (`iso21090-EN-representation` …) are otherwise used in JP data unchecked.
        let by_url = match type_profile {
            // Not at the root of an extension's own definition: that is where this leads.
            None if ty == "Extension"
                && !self.v.structure_only
                && !std::ptr::eq(def, &profile.root) =>
            {
                self.extension_by_url(obj, path)
            }
            _ => None,
        };
        if let Some(p) = by_url {
            self.extension_placement(&p, path, resource);
            self.through(value, def, &p, ty, path, resource);
            return;
        }
        if let Some(tp) = type_profile {
            if let Some(p) = self.v.profile(tp) {
                self.through(value, def, &p, ty, path, resource);
                return;
            } else if ty == "Extension" {
                self.warn(
                    "not-found",
                    path,
                    &format!("拡張の定義が見つかりません: {tp}"),
                    &format!("extension definition not found: {tp}"),
                );
            }
        }
        let owner_profile = profile.clone();
        let owner: &ElDef = if let Some(cr) = &def.content_ref {
            match owner_profile.by_path.get(cr) {
                Some(d) => d,
                None => def,
            }
        } else if def.children.is_empty() {
            match self.v.profile(ty) {
                Some(base) => {
                    self.through(value, def, &base, ty, path, resource);
                    return;
                }
                None => def,
            }
        } else {
            def
        };
        let children = &owner.children;
        if !children.is_empty() {
            // Visit the children the object has, then the required ones it lacks. One pass over
            // the object pairs each key's value with its `_` extension under its child, so no
            // child looks its keys up again (the object's map hashes with SipHash).
            let mut found: Vec<(usize, Present<'_, 'v>)> = Vec::with_capacity(obj.len());
            let mut unknown = false;
            for (key, val) in obj {
                let (bare, is_ext) = match key.strip_prefix('_') {
                    Some(b) => (b, true),
                    None => (key.as_str(), false),
                };
                let Some(&i) = owner.key_index.get(bare) else {
                    if !(key == "resourceType" && is_res) && key != "fhir_comments" {
                        unknown = true;
                    }
                    continue;
                };
                let Some(jk) = children[i].json_keys.iter().find(|jk| jk.0 == bare) else {
                    continue;
                };
                match found.iter_mut().find(|(_, p)| std::ptr::eq(p.0, jk)) {
                    Some((_, p)) if is_ext => p.2 = Some(val),
                    Some((_, p)) => p.1 = Some(val),
                    None if is_ext => found.push((i, (jk, None, Some(val)))),
                    None => found.push((i, (jk, Some(val), None))),
                }
            }
            if unknown {
                self.unknown_keys(obj, children, ty, path);
            }
            // Stable: a choice's types stay in the object's order.
            found.sort_by_key(|(i, _)| *i);
            for group in found.chunk_by(|a, b| a.0 == b.0) {
                let def = &children[group[0].0];
                self.child_items(group, def, path, resource, profile);
            }
            for &i in &owner.required {
                if found.binary_search_by_key(&i, |(j, _)| *j).is_err() {
                    self.child(obj, &children[i], path, resource, profile, is_res);
                }
            }
        }
        if ty == "Extension" {
            let has_value = obj.keys().any(|k| k.starts_with("value"));
            let has_ext = obj
                .member("extension")
                .and_then(Value::as_array)
                .map(|a| !a.is_empty())
                .unwrap_or(false);
            if has_value && has_ext {
                self.error(
                    "invariant",
                    path,
                    "拡張は値か入れ子の拡張のどちらか一方です (ext-1)",
                    "an extension has either a value or nested extensions, not both (ext-1)",
                );
            }
        }
        if ty == "Reference" {
            self.reference(obj, def, path, resource);
        }
        self.fixed_pattern(value, def, path);
        self.binding(value, def, ty, path);
        self.constraints(value, None, def, ty, path, resource);
    }

    /// Validates `value` through another definition of its type (a type profile, an extension's
    /// own definition, the base type), then checks what `def` adds there: a Reference's target
    /// types, fixed and pattern values, the binding and the invariants.
    fn through(
        &mut self,
        value: &'v Value,
        def: &ElDef,
        other: &Arc<Profile>,
        ty: &str,
        path: &str,
        resource: &'v Value,
    ) {
        self.element(value, None, &other.root, ty, path, resource, other);
        if ty == "Reference" {
            self.reference_type_after_recursion(value, def, path, resource);
        }
        self.fixed_pattern(value, def, path);
        self.binding(value, def, ty, path);
        self.constraints(value, None, def, ty, path, resource);
    }

    /// The definition of an unsliced extension, by its `url`. Only a loaded Extension definition
    /// is used; the lookup does not parse or cache a URL the registry lacks, since URLs come from
    /// input. An unknown URL in the core namespace (`http://hl7.org/fhir/StructureDefinition/`),
    /// where every R4 extension is loaded, is reported as a warning: it is misspelt or from a
    /// later FHIR version. Elsewhere an unknown extension is allowed silently, as extensions are
    /// meant to be.
    fn extension_by_url(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Option<Arc<Profile>> {
        let url = obj.member("url").and_then(Value::as_str)?;
        if !self.v.registry.contains(url) {
            if sent_as_modifier(path) {
                // A modifier changes what its element means; one nobody can read cannot be
                // ignored (FHIR R4 §2.4: such data is refused or not processed).
                self.error(
                    "extension",
                    path,
                    &format!("定義のない修飾拡張は受け付けられません: {url}"),
                    &format!("unknown modifier extension, which cannot be ignored: {url}"),
                );
            } else if url.starts_with(CORE_EXTENSIONS) && url.len() > CORE_EXTENSIONS.len() {
                self.warn(
                    "not-found",
                    path,
                    &format!("拡張の定義が見つかりません: {url}"),
                    &format!("extension definition not found: {url}"),
                );
            }
            return None;
        }
        self.v
            .profile(url)
            .filter(|p| p.type_name == "Extension" && p.url != EXTENSION_BASE)
    }

    /// Reports an extension used where its definition's `context` does not allow it (a name
    /// representation, defined for `HumanName`, placed on a Condition). The element holding it is
    /// known by its path in the base definitions (`Patient.name`, `HumanName`,
    /// `Observation.component`), its type and the types that type derives from; a context of
    /// type `element` must name one of these, or `Element`. Contexts of other kinds, and paths
    /// this walk cannot follow, are given the benefit of the doubt: a false refusal would turn away
    /// a valid submission.
    ///
    /// An extension whose definition makes it a modifier must be sent as `modifierExtension`, and
    /// only such an extension may be: the element says whether a reader may ignore it.
    fn extension_placement(&mut self, ext: &Profile, path: &str, resource: &'v Value) {
        if ext.is_modifier != sent_as_modifier(path) {
            let (ja, en) = if ext.is_modifier {
                (
                    "修飾拡張なので modifierExtension に置く必要があります",
                    "is a modifier extension: it must be sent as modifierExtension",
                )
            } else {
                (
                    "修飾拡張ではないので modifierExtension には置けません",
                    "is not a modifier extension: it must not be sent as modifierExtension",
                )
            };
            self.error(
                "structure",
                path,
                &format!("拡張 {} は{ja}", ext.url),
                &format!("extension {} {en}", ext.url),
            );
        }
        let Some(allowed) = &ext.contexts else {
            return;
        };
        let Some(rt) = resource.member("resourceType").and_then(Value::as_str) else {
            return;
        };
        let Some(names) = self.holder_names(rt, path.get(self.resource_start..).unwrap_or(""))
        else {
            return;
        };
        if allowed.iter().any(|a| names.iter().any(|n| n == a)) {
            return;
        }
        let (allowed, here) = (allowed.join(", "), names.join(", "));
        self.error(
            "structure",
            path,
            &format!(
                "拡張 {} はここでは使えません (使える場所: {allowed}; この要素: {here})",
                ext.url
            ),
            &format!(
                "extension {} is not allowed here (allowed: {allowed}; this element is {here})",
                ext.url
            ),
        );
    }

    /// The names the element holding an extension goes by: its path in the base definitions
    /// (`Patient.name.family`), its path in the definition it belongs to (`HumanName.family`),
    /// its type and that type's ancestors. `rel` is the extension's path within its resource
    /// (`.name[0].extension[1]`). `None` when the path cannot be followed.
    fn holder_names(&self, rt: &str, rel: &str) -> Option<Vec<String>> {
        let mut steps: Vec<&str> = rel
            .split('.')
            .filter(|s| !s.is_empty())
            .map(|s| s.split('[').next().unwrap_or(s))
            .collect();
        match steps.pop() {
            Some("extension" | "modifierExtension") => {}
            _ => return None,
        }
        let base = self.v.profile(rt)?;
        let mut walk = HolderWalk {
            full_path: rt.to_string(),
            names: Vec::new(),
            ty: rt.to_string(),
        };
        self.walk_to_holder(&base, &base.root, &steps, &mut walk)?;
        let HolderWalk {
            full_path,
            mut names,
            ty,
        } = walk;
        names.insert(0, full_path);
        let ancestors = self.v.profile(&ty).map(|p| p.ancestors.clone());
        names.push(ty);
        for a in ancestors.iter().flatten() {
            names.extend(a.rsplit('/').next().map(str::to_string));
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        Some(names)
    }

    /// One step of [`Run::holder_names`]: follows `steps` from `def` in `profile`, into the
    /// definition of each data type on the way.
    fn walk_to_holder(
        &self,
        profile: &Profile,
        def: &ElDef,
        steps: &[&str],
        walk: &mut HolderWalk,
    ) -> Option<()> {
        let Some((step, rest)) = steps.split_first() else {
            if !std::ptr::eq(def, &profile.root) {
                walk.names.push(def.id.clone());
            }
            return Some(());
        };
        let child = def.children.get(*def.key_index.get(*step)?)?;
        let (_, _, child_ty) = child.json_keys.iter().find(|k| k.0 == *step)?;
        walk.full_path.push('.');
        walk.full_path.push_str(&child.name_in_path());
        walk.ty = child_ty.clone();
        if let Some(target) = &child.content_ref {
            let target = profile.by_path.get(target.trim_start_matches('#'))?;
            return self.walk_to_holder(profile, target, rest, walk);
        }
        if !child.children.is_empty() {
            return self.walk_to_holder(profile, child, rest, walk);
        }
        if rest.is_empty() {
            walk.names.push(child.id.clone());
            return Some(());
        }
        let inner = self.v.profile(child_ty)?;
        self.walk_to_holder(&inner, &inner.root, rest, walk)
    }

    fn primitive_extensions(&mut self, ext: &'v Value, path: &str, resource: &'v Value) {
        let Some(obj) = ext.as_object() else {
            self.error(
                "structure",
                path,
                "_要素は JSON オブジェクトである必要があります",
                "the _element must be a JSON object",
            );
            return;
        };
        if let Some(base) = self.v.profile("Element") {
            for k in obj.keys() {
                if k != "id" && k != "extension" {
                    self.error(
                        "structure",
                        &format!("{path}.{k}"),
                        "プリミティブの拡張に使えない要素です",
                        "unknown element in a primitive's extension object",
                    );
                }
            }
            if let Some(extdef) = base.root.child("extension") {
                let extdef = extdef.clone();
                self.child(obj, &extdef, path, resource, &base, false);
            }
        }
    }

    /// Reports JSON keys that no child definition accounts for.
    fn unknown_keys(&mut self, obj: &Map<String, Value>, children: &[ElDef], ty: &str, path: &str) {
        if children.is_empty() {
            return;
        }
        for key in obj.keys() {
            if key == "resourceType" && is_resource_type(self.v, ty) {
                continue;
            }
            if key == "fhir_comments" {
                continue;
            }
            let bare = key.strip_prefix('_').unwrap_or(key);
            let known = children
                .iter()
                .any(|c| c.json_keys.iter().any(|k| k.0 == bare));
            if !known {
                let choice_parent = children
                    .iter()
                    .find(|c| c.choice && bare.starts_with(c.name.as_str()));
                match choice_parent {
                    Some(c) => {
                        let allowed: Vec<String> = c
                            .types
                            .iter()
                            .map(|t| format!("{}{}", c.name, choice_suffix(&t.code)))
                            .collect();
                        self.error(
                            "structure",
                            &format!("{path}.{key}"),
                            &format!(
                                "この型は {}[x] に使えません (可能: {})",
                                c.name,
                                allowed.join(", ")
                            ),
                            &format!(
                                "type not allowed for {}[x] (allowed: {})",
                                c.name,
                                allowed.join(", ")
                            ),
                        );
                    }
                    None => self.error(
                        "structure",
                        &format!("{path}.{key}"),
                        &format!("不明な要素 {key} ({ty} にはありません)"),
                        &format!("unknown element {key} (not in {ty})"),
                    ),
                }
            }
        }
    }

    /// Checks one child definition: gathers its values, cardinality, shape, slicing, and each item.
    fn child(
        &mut self,
        obj: &'v Map<String, Value>,
        def: &ElDef,
        path: &str,
        resource: &'v Value,
        profile: &Arc<Profile>,
        _parent_is_resource: bool,
    ) {
        fn look_up<'a, 'v>(
            obj: &'v Map<String, Value>,
            jk: &'a (String, String, String),
        ) -> (usize, Present<'a, 'v>) {
            (0, (jk, json::field(obj, &jk.0), json::field(obj, &jk.1)))
        }
        let lookup = |jk| look_up(obj, jk);
        let present: Vec<(usize, Present<'_, 'v>)> = if def.choice {
            // Few keys per object, many types per choice: scan the object.
            let name = def.name.as_str();
            obj.keys()
                .filter(|k| k.trim_start_matches('_').starts_with(name))
                .filter_map(|k| {
                    def.json_keys
                        .iter()
                        .find(|jk| jk.0 == k.trim_start_matches('_'))
                })
                .fold(Vec::new(), |mut acc: Vec<(usize, Present<'_, 'v>)>, jk| {
                    if !acc.iter().any(|x| x.1 .0 .0 == jk.0) {
                        acc.push(lookup(jk));
                    }
                    acc
                })
        } else {
            def.json_keys
                .iter()
                .map(lookup)
                .filter(|(_, (_, val, ext))| val.is_some() || ext.is_some())
                .collect()
        };
        self.child_items(&present, def, path, resource, profile);
    }

    /// Checks one child definition given the keys the object has for it (`present`, in the
    /// object's order): cardinality, shape, slicing, and each item.
    fn child_items(
        &mut self,
        present: &[(usize, Present<'_, 'v>)],
        def: &ElDef,
        path: &str,
        resource: &'v Value,
        profile: &Arc<Profile>,
    ) {
        // Most elements have a few items: kept inline, this was an allocation per element and
        // 2 % of registration's request time.
        let mut items: SmallVec<[ChildItem<'v, '_>; 4]> = SmallVec::new();
        static NULL: Value = Value::Null;
        if present.is_empty() {
            if def.min > 0 {
                let name_path = format!("{path}.{}", def.name_in_path());
                self.error(
                    "required",
                    &name_path,
                    &format!(
                        "必須要素がありません: {} は最低 {} 個必要です (現在 0)",
                        def.name, def.min
                    ),
                    &format!(
                        "minimum required = {}, but only found 0 ({})",
                        def.min, def.name
                    ),
                );
            }
            for s in &def.slices {
                if s.min > 0 {
                    let name_path = format!("{path}.{}", def.name);
                    self.slice_min_error(&name_path, s, 0);
                }
            }
            return;
        }
        for &(_, ((key, _, ty), val, ext)) in present {
            let (key, ty) = (key.as_str(), ty.as_str());
            let is_array = matches!(val, Some(Value::Array(_)))
                || matches!((val, ext), (None, Some(Value::Array(_))));
            // JSON shape follows the base element's cardinality, not the profile's.
            let expect_array = def.base_many.unwrap_or(def.max != Some(1));
            if is_array != expect_array {
                if expect_array {
                    self.error(
                        "structure",
                        &format!("{path}.{key}"),
                        "配列である必要があります",
                        "must be a JSON array",
                    );
                } else {
                    self.error(
                        "structure",
                        &format!("{path}.{key}"),
                        "配列は使えません (最大 1)",
                        "must not be an array (max 1)",
                    );
                }
                continue;
            }
            match (val, ext) {
                (Some(Value::Array(vs)), e) => {
                    let es = e.and_then(Value::as_array);
                    if vs.is_empty() {
                        self.error(
                            "structure",
                            &format!("{path}.{key}"),
                            "空の配列は使えません",
                            "arrays must not be empty",
                        );
                    }
                    if let Some(es) = es {
                        if es.len() != vs.len() {
                            self.error(
                                "structure",
                                &format!("{path}._{key}"),
                                "_配列の長さが値の配列と違います",
                                "the _array must have the same length as the value array",
                            );
                        }
                    }
                    for (i, x) in vs.iter().enumerate() {
                        let xe = es.and_then(|a| a.get(i)).filter(|v| !v.is_null());
                        items.push((x, xe, ty, key, true));
                    }
                }
                (None, Some(Value::Array(es))) => {
                    for e in es {
                        items.push((&NULL, Some(e), ty, key, true));
                    }
                }
                (Some(x), e) => items.push((x, e, ty, key, false)),
                (None, Some(e)) => items.push((&NULL, Some(e), ty, key, false)),
                (None, None) => {}
            }
        }
        // Only error messages use it: built when one is reported, not for every child.
        let name_path = || format!("{path}.{}", def.name_in_path());
        let n = items.len() as u32;
        if n < def.min {
            self.error(
                "required",
                &name_path(),
                &format!(
                    "必須要素がありません: {} は最低 {} 個必要です (現在 {n})",
                    def.name, def.min
                ),
                &format!(
                    "minimum required = {}, but only found {n} ({})",
                    def.min, def.name
                ),
            );
        }
        if let Some(max) = def.max {
            if n > max {
                self.error(
                    "structure",
                    &name_path(),
                    &format!("{} は最大 {max} 個までです (現在 {n})", def.name),
                    &format!("maximum allowed = {max}, but found {n} ({})", def.name),
                );
            }
        }
        if items.is_empty() {
            // Slices with a minimum still need checking when the element is absent.
            for s in &def.slices {
                if s.min > 0 {
                    self.slice_min_error(&name_path(), s, 0);
                }
            }
            return;
        }
        // Assign items to slices.
        let mut slice_of: SmallVec<[Option<usize>; 4]> = smallvec::smallvec![None; items.len()];
        if let Some(slicing) = &def.slicing {
            for (idx, (x, _, _, _, _)) in items.iter().enumerate() {
                for (si, s) in def.slices.iter().enumerate() {
                    if self.in_slice(x, s, &slicing.discriminators) {
                        slice_of[idx] = Some(si);
                        break;
                    }
                }
            }
            for (si, s) in def.slices.iter().enumerate() {
                let count = slice_of.iter().filter(|x| **x == Some(si)).count() as u32;
                if count < s.min {
                    self.slice_min_error(&name_path(), s, count);
                }
                if let Some(max) = s.max {
                    if count > max {
                        self.error(
                            "structure",
                            &name_path(),
                            &format!(
                                "スライス {} は最大 {max} 個までです (現在 {count})",
                                s.slice_name.as_deref().unwrap_or("")
                            ),
                            &format!(
                                "slice {} allows at most {max}, found {count}",
                                s.slice_name.as_deref().unwrap_or("")
                            ),
                        );
                    }
                }
            }
        } else if def.choice && !def.slices.is_empty() {
            // Type slices of a choice element (`value[x]:valueQuantity`).
            for (idx, (_, _, ty, _, _)) in items.iter().enumerate() {
                slice_of[idx] = def.slices.iter().position(|s| s.allows_type(ty));
            }
        }
        for (idx, (x, e, ty, key, in_array)) in items.into_iter().enumerate() {
            // Paths are built in a buffer kept per depth, so siblings reuse one allocation.
            let depth = self.path_depth;
            if self.path_bufs.len() <= depth {
                self.path_bufs.resize_with(depth + 1, String::new);
            }
            let mut ipath = std::mem::take(&mut self.path_bufs[depth]);
            ipath.clear();
            ipath.push_str(path);
            ipath.push('.');
            ipath.push_str(key);
            if in_array {
                use std::fmt::Write as _;
                let _ = write!(ipath, "[{idx}]");
            }
            self.path_depth += 1;
            let closed_miss = slice_of[idx].is_none()
                && def
                    .slicing
                    .as_ref()
                    .map(|sl| sl.closed && !def.slices.is_empty())
                    .unwrap_or(false);
            if let Some(si) = slice_of[idx] {
                self.element(x, e, &def.slices[si], ty, &ipath, resource, profile);
            } else if closed_miss {
                let names: Vec<&str> = def
                    .slices
                    .iter()
                    .filter_map(|s| s.slice_name.as_deref())
                    .collect();
                self.error(
                    "structure",
                    &ipath,
                    &format!(
                        "どのスライスにも一致しません (閉じたスライシング: {})",
                        names.join(", ")
                    ),
                    &format!(
                        "does not match any slice of a closed slicing ({})",
                        names.join(", ")
                    ),
                );
                // Report why against the slices of the same type, to help the sender.
                self.explain_slice_mismatch(x, def, ty, &ipath, profile);
            } else {
                self.element(x, e, def, ty, &ipath, resource, profile);
            }
            self.path_depth -= 1;
            self.path_bufs[depth] = ipath;
        }
    }

    fn slice_min_error(&mut self, name_path: &str, s: &ElDef, count: u32) {
        let sn = s.slice_name.as_deref().unwrap_or("");
        self.error(
            "required",
            name_path,
            &format!("スライス {sn} が必要です: 最低 {} 個 (現在 {count})", s.min),
            &format!("slice {sn} requires at least {}, found {count}", s.min),
        );
    }

    fn explain_slice_mismatch(
        &mut self,
        x: &'v Value,
        def: &ElDef,
        ty: &str,
        path: &str,
        profile: &Arc<Profile>,
    ) {
        // For entries sliced by resource profile: validate against the slice whose resource type matches.
        let rt = x.pointer("/resource/resourceType").and_then(Value::as_str);
        if let Some(rt) = rt {
            if let Some(s) = def.slices.iter().find(|s| {
                s.child("resource")
                    .map(|r| r.allows_type(rt))
                    .unwrap_or(false)
            }) {
                self.element(x, None, s, ty, path, self.root, profile);
                return;
            }
        }
        let _ = (x, profile);
    }

    /// Does `item` belong to slice `s` by the discriminators?
    fn in_slice(&self, item: &'v Value, s: &ElDef, discs: &[(String, String)]) -> bool {
        if discs.is_empty() {
            return false;
        }
        discs.iter().all(|(kind, dpath)| {
            let (targets, sdef) = self.disc_values(item, s, dpath);
            match kind.as_str() {
                "value" | "pattern" => {
                    // Extensions are told apart by the URL of their profile.
                    let ext_url = if dpath == "url" {
                        s.types.iter().find_map(|t| t.profiles.first())
                    } else {
                        None
                    };
                    let Some(sdef) = sdef else {
                        return ext_url
                            .map(|u| targets.iter().any(|t| t.as_str() == Some(u.as_str())))
                            .unwrap_or(false);
                    };
                    if let Some(w) = sdef.implied_pattern.as_ref() {
                        return targets.iter().any(|t| {
                            if kind == "value" {
                                *t == w || matches_pattern(t, w)
                            } else {
                                matches_pattern(t, w)
                            }
                        });
                    }
                    if let Some(u) = ext_url {
                        return targets.iter().any(|t| t.as_str() == Some(u.as_str()));
                    }
                    // A required binding can discriminate too.
                    match &sdef.binding {
                        Some(b) if b.strength == "required" => targets.iter().any(|t| {
                            let code = t
                                .as_str()
                                .or_else(|| t.member("code").and_then(Value::as_str));
                            let sys = t.member("system").and_then(Value::as_str);
                            code.map(|c| {
                                self.v.terminology.validate_code(&b.value_set, sys, c)
                                    == Membership::Member
                            })
                            .unwrap_or(false)
                        }),
                        _ => false,
                    }
                }
                "type" => {
                    let Some(sdef) = sdef else { return false };
                    targets.iter().any(|t| {
                        let rt = t.member("resourceType").and_then(Value::as_str);
                        sdef.types.iter().any(|ty| Some(ty.code.as_str()) == rt)
                    })
                }
                "profile" => {
                    let Some(sdef) = sdef else { return false };
                    // Through resolve(), a Reference's targetProfile names what the target must be.
                    let profiles: Vec<&String> = sdef
                        .types
                        .iter()
                        .flat_map(|t| {
                            if t.code == "Reference" {
                                t.target_profiles.iter()
                            } else {
                                t.profiles.iter()
                            }
                        })
                        .collect();
                    targets.iter().any(|t| {
                        let rt = t
                            .member("resourceType")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        if !sdef.types.iter().any(|ty| {
                            ty.code == rt || ty.code == "Resource" || ty.code == "Reference"
                        }) {
                            return false;
                        }
                        profiles.iter().any(|p| {
                            // A claimed profile is checked where the item is validated; one
                            // derived from `p` answers for `p` too.
                            let claimed = t
                                .pointer("/meta/profile")
                                .and_then(Value::as_array)
                                .map(|a| {
                                    a.iter().filter_map(Value::as_str).any(|c| {
                                        c == p.as_str()
                                            || c.split('|').next() == Some(p.as_str())
                                            || self.v.profile(c).is_some_and(|cp| cp.covers(p))
                                    })
                                })
                                .unwrap_or(false);
                            claimed || self.v.conforms_to(t, p) == Some(true)
                        })
                    })
                }
                "exists" => {
                    let present = !targets.is_empty();
                    match sdef {
                        Some(d) if d.max == Some(0) => !present,
                        Some(d) if d.min > 0 => present,
                        _ => present,
                    }
                }
                _ => false,
            }
        })
    }

    /// Values at a discriminator path in an item, and the slice's definition at that path.
    fn disc_values<'d>(
        &self,
        item: &'v Value,
        s: &'d ElDef,
        dpath: &str,
    ) -> (Vec<&'v Value>, Option<&'d ElDef>) {
        if dpath == "$this" {
            return (vec![item], Some(s));
        }
        let mut vals = vec![item];
        let mut def = Some(s);
        for seg in dpath.split('.') {
            let seg = seg.trim();
            if seg.starts_with("ofType(") {
                continue;
            }
            if seg == "resolve()" {
                vals = vals
                    .into_iter()
                    .filter_map(|v| v.member("reference").and_then(Value::as_str))
                    .filter_map(|r| resolve_in(self.root, self.root, r))
                    .collect();
                continue;
            }
            if let Some(url) = seg
                .strip_prefix("extension('")
                .and_then(|r| r.strip_suffix("')"))
            {
                vals = vals
                    .into_iter()
                    .filter_map(|v| v.member("extension").and_then(Value::as_array))
                    .flatten()
                    .filter(|e| e.member("url").and_then(Value::as_str) == Some(url))
                    .collect();
                def = def.and_then(|d| d.child("extension")).and_then(|e| {
                    e.slices
                        .iter()
                        .find(|sl| sl.types.iter().any(|t| t.profiles.iter().any(|p| p == url)))
                });
                continue;
            }
            let mut next = Vec::new();
            for v in vals {
                match v.member(seg) {
                    Some(Value::Array(a)) => next.extend(a.iter()),
                    Some(x) => next.push(x),
                    None => {
                        // Choice: `value` matches `valueQuantity` etc.
                        if let Some(o) = v.as_object() {
                            for (k, x) in o {
                                if k.starts_with(seg)
                                    && k.len() > seg.len()
                                    && k.as_bytes()[seg.len()].is_ascii_uppercase()
                                {
                                    next.push(x);
                                }
                            }
                        }
                    }
                }
            }
            vals = next;
            def = def.and_then(|d| d.child(seg));
        }
        (vals, def)
    }

    fn nested_resource(&mut self, value: &'v Value, def: &ElDef, path: &str, container: &'v Value) {
        let Some(rt) = value.member("resourceType").and_then(Value::as_str) else {
            self.error(
                "structure",
                path,
                "resourceType がありません",
                "missing resourceType in nested resource",
            );
            return;
        };
        let model = self.v.registry.model();
        if !model.is_resource(rt) {
            self.error(
                "structure",
                path,
                &format!("不明な resourceType: {rt}"),
                &format!("unknown resourceType {rt}"),
            );
            return;
        }
        let allowed = def
            .types
            .iter()
            .any(|t| t.code == "Resource" || t.code == "DomainResource" || t.code == rt);
        if !allowed {
            let names: Vec<&str> = def.types.iter().map(|t| t.code.as_str()).collect();
            self.error(
                "structure",
                path,
                &format!("{rt} はここに置けません (可能: {})", names.join(", ")),
                &format!("{rt} is not allowed here (allowed: {})", names.join(", ")),
            );
            return;
        }
        let profiles: Vec<String> = def
            .types
            .iter()
            .filter(|t| t.code == rt)
            .flat_map(|t| t.profiles.iter().cloned())
            .collect();
        let saved = self.container;
        if def.name == "contained" {
            self.container = Some(container);
        } else {
            self.container = None;
        }
        self.resource(value, rt, &profiles, path, self.root);
        self.container = saved;
    }

    fn reference(
        &mut self,
        obj: &Map<String, Value>,
        def: &ElDef,
        path: &str,
        resource: &'v Value,
    ) {
        let Some(r) = obj.member("reference").and_then(Value::as_str) else {
            return;
        };
        if r == "#" {
            return;
        }
        let target = self.local_target(r, resource);
        if target.is_none() {
            if r.starts_with('#') {
                self.error(
                    "not-found",
                    &format!("{path}.reference"),
                    &format!("contained に {r} がありません"),
                    &format!("contained resource {r} not found"),
                );
                return;
            }
            if r.starts_with("urn:") && self.in_bundle() {
                self.error(
                    "not-found",
                    &format!("{path}.reference"),
                    &format!("Bundle 内に参照先 {r} がありません"),
                    &format!("reference {r} does not resolve to an entry of the Bundle"),
                );
                return;
            }
        }
        self.reference_type(r, target, def, path);
    }

    /// Checks that what a reference points to is of a type its element allows (`def`'s target
    /// profiles). A reference that does not resolve here still names its target's type when it is
    /// literal (`Organization/123`, `https://…/fhir/Patient/9`); otherwise nothing is known.
    fn reference_type(&mut self, r: &str, target: Option<&Value>, def: &ElDef, path: &str) {
        let rt = match target {
            Some(t) => t
                .member("resourceType")
                .and_then(Value::as_str)
                .unwrap_or(""),
            None => match literal_type(r) {
                Some(t) if self.v.registry.model().is_resource(t) => t,
                _ => return,
            },
        };
        let targets: Vec<&String> = def
            .types
            .iter()
            .flat_map(|t| t.target_profiles.iter())
            .collect();
        if targets.is_empty() {
            return;
        }
        let ok = targets.iter().any(|tp| {
            let base = tp.rsplit('/').next().unwrap_or("");
            base == rt
                || base == "Resource"
                || self
                    .v
                    .profile(tp)
                    .map(|p| p.type_name == rt)
                    .unwrap_or(false)
        });
        if !ok {
            self.error(
                "structure",
                &format!("{path}.reference"),
                &format!("参照先の型 {rt} は許可されていません"),
                &format!("reference target type {rt} is not allowed here"),
            );
        }
    }

    /// A Reference element validated through its type's own definition (which knows no targets):
    /// its target type is checked against the element's definition here, without reporting again
    /// what the recursion already said about resolving it.
    fn reference_type_after_recursion(
        &mut self,
        value: &'v Value,
        def: &ElDef,
        path: &str,
        resource: &'v Value,
    ) {
        let Some(r) = value.member("reference").and_then(Value::as_str) else {
            return;
        };
        if def.types.iter().all(|t| t.target_profiles.is_empty()) {
            return;
        }
        let target = self.local_target(r, resource);
        if target.is_none() && (r.starts_with('#') || r.starts_with("urn:")) {
            return;
        }
        self.reference_type(r, target, def, path);
    }

    /// What a reference points to inside the message: a contained resource (`#id`), or an entry
    /// of the Bundle being validated.
    fn local_target(&self, r: &str, resource: &'v Value) -> Option<&'v Value> {
        if let Some(id) = r.strip_prefix('#') {
            resource
                .member("contained")
                .and_then(Value::as_array)?
                .iter()
                .find(|x| x.member("id").and_then(Value::as_str) == Some(id))
        } else if self.in_bundle() {
            resolve_in(self.root, resource, r)
        } else {
            None
        }
    }

    fn in_bundle(&self) -> bool {
        self.root.member("resourceType").and_then(Value::as_str) == Some("Bundle")
    }

    /// dom-3: every contained resource is referenced from the rest of the resource (or refers to it with `#`).
    fn dom3(&mut self, resource: &'v Value, path: &str) {
        if self.v.structure_only {
            return;
        }
        let Some(Value::Array(contained)) = resource.member("contained") else {
            return;
        };
        let mut refs = Vec::new();
        collect_refs(resource, &mut refs);
        let mut in_contained = Vec::new();
        for c in contained {
            collect_refs(c, &mut in_contained);
        }
        let points_home = refs.contains(&"#") || in_contained.contains(&"#");
        for (i, c) in contained.iter().enumerate() {
            let id = c.member("id").and_then(Value::as_str).unwrap_or("");
            let wanted = format!("#{id}");
            if !points_home && !refs.iter().chain(in_contained.iter()).any(|r| *r == wanted) {
                self.issues.push(
                    Issue::new(
                        Severity::Error,
                        "invariant",
                        format!("{path}.contained[{i}]"),
                        "contained リソースがどこからも参照されていません (dom-3)",
                        "a contained resource is not referenced from the containing resource (dom-3)",
                    )
                    .with_rule("dom-3"),
                );
            }
        }
    }

    fn fixed_pattern(&mut self, value: &Value, def: &ElDef, path: &str) {
        if value.is_null() {
            return;
        }
        if let Some(f) = &def.fixed {
            let equal = match (value, f) {
                (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                _ => value == f,
            };
            if !equal {
                self.error(
                    "value",
                    path,
                    &format!("固定値 {} と一致しません", compact(f)),
                    &format!("value must be exactly {}", compact(f)),
                );
            }
        }
        if let Some(p) = &def.pattern {
            if !matches_pattern(value, p) {
                self.error(
                    "value",
                    path,
                    &format!("パターン {} と一致しません", compact(p)),
                    &format!("value does not match the pattern {}", compact(p)),
                );
            }
        }
    }

    fn binding(&mut self, value: &Value, def: &ElDef, ty: &str, path: &str) {
        if self.v.structure_only {
            return;
        }
        // Codes of local CodeSystems must exist even without a binding.
        // Paths are only built when an issue is reported.
        let codings: Vec<(Option<&str>, &str, CodePath)> = match ty {
            "code" => value
                .as_str()
                .map(|c| vec![(None, c, CodePath::Here)])
                .unwrap_or_default(),
            "Coding" => coding_of(value, CodePath::Code).into_iter().collect(),
            "CodeableConcept" => value
                .member("coding")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .filter_map(|(i, c)| coding_of(c, CodePath::CodingCode(i)))
                        .collect()
                })
                .unwrap_or_default(),
            "Quantity" | "Age" | "Duration" | "Distance" | "Count" | "SimpleQuantity"
            | "MoneyQuantity" => value
                .member("code")
                .and_then(Value::as_str)
                .map(|c| {
                    vec![(
                        value.member("system").and_then(Value::as_str),
                        c,
                        CodePath::Code,
                    )]
                })
                .unwrap_or_default(),
            _ => return,
        };
        if ty != "code" && def.binding.is_none() {
            for (sys, code, p) in &codings {
                if let Some(s) = sys {
                    if self.v.terminology.code_in_system(s, code) == Membership::NotMember {
                        self.error(
                            "code-invalid",
                            &p.render(path),
                            &format!("コード {code} はコードシステム {s} にありません"),
                            &format!("code {code} is not defined in code system {s}"),
                        );
                    }
                }
            }
        }
        let Some(b) = &def.binding else { return };
        if b.strength != "required" && b.strength != "extensible" {
            return;
        }
        let vs = b.value_set.clone();
        if !self.v.terminology.knows_value_set(&vs) {
            if b.strength == "required" {
                self.warn(
                    "not-found",
                    path,
                    &format!("値セットが見つからないため検査できません: {vs}"),
                    &format!("value set not found, code not checked: {vs}"),
                );
            }
            return;
        }
        if codings.is_empty() {
            if ty == "CodeableConcept"
                && b.strength == "required"
                && value.member("text").is_some()
                && value.member("coding").is_none()
            {
                self.error(
                    "code-invalid",
                    path,
                    &format!("必須の値セット {vs} のコードがありません"),
                    &format!("no code from the required value set {vs}"),
                );
            }
            return;
        }
        let mut any_member = false;
        let mut any_unknown = false;
        let mut bad = Vec::new();
        for (sys, code, p) in &codings {
            if let Some(s) = sys {
                if self.v.terminology.code_in_system(s, code) == Membership::NotMember {
                    self.error(
                        "code-invalid",
                        &p.render(path),
                        &format!("コード {code} はコードシステム {s} にありません"),
                        &format!("code {code} is not defined in code system {s}"),
                    );
                    continue;
                }
            }
            match self.v.terminology.validate_code(&vs, *sys, code) {
                Membership::Member => any_member = true,
                Membership::Unknown => any_unknown = true,
                Membership::NotMember => bad.push((code.to_string(), *p)),
            }
        }
        if any_member {
            return;
        }
        if any_unknown {
            if b.strength == "required" {
                self.warn(
                    "code-invalid",
                    path,
                    &format!(
                        "コードシステムを参照できないため値セット {vs} への所属を確認できません"
                    ),
                    &format!("cannot check membership in {vs}: code system content not available"),
                );
            }
            return;
        }
        for (code, p) in bad {
            if b.strength == "required" {
                self.error(
                    "code-invalid",
                    &p.render(path),
                    &format!("コード {code} は必須の値セット {vs} にありません"),
                    &format!("code {code} is not in the required value set {vs}"),
                );
            } else {
                self.warn(
                    "code-invalid",
                    &p.render(path),
                    &format!("コード {code} は拡張可能な値セット {vs} にありません"),
                    &format!("code {code} is not in the extensible value set {vs}"),
                );
            }
            // One CodeableConcept needs one good coding: report the first only.
            if ty == "CodeableConcept" {
                break;
            }
        }
    }

    fn invariant_failed(&mut self, c: &profile::Constraint, path: &str) {
        let sev = if c.error {
            Severity::Error
        } else {
            Severity::Warning
        };
        let human = if c.human.is_empty() {
            &c.source
        } else {
            &c.human
        };
        self.issues.push(
            Issue::new(
                sev,
                "invariant",
                path,
                format!("制約 {} に違反しています: {human}", c.key),
                format!("constraint {} failed: {human}", c.key),
            )
            .with_rule(c.key.clone()),
        );
    }

    fn constraints(
        &mut self,
        value: &'v Value,
        ext: Option<&'v Value>,
        def: &ElDef,
        ty: &str,
        path: &str,
        resource: &'v Value,
    ) {
        if def.constraints.is_empty() || self.v.structure_only {
            return;
        }
        let model = self.v.registry.model();
        // Backbone elements navigate by their path in the base type (`Bundle.entry`).
        let key = if ty == "BackboneElement" || ty == "Element" {
            def.base_path.as_str()
        } else {
            ty
        };
        let info = model.get(key).or_else(|| model.get(ty));
        // `key` differs from `ty` only for BackboneElement and Element, never resources.
        let is_res = key == ty && is_resource_kind(ty, info.map(|t| t.kind));
        let ty_owned: &str = match info {
            Some(t) => t.key.as_str(),
            None => crate::model::PRIMITIVES
                .iter()
                .find(|p| **p == ty)
                .copied()
                .unwrap_or("Element"),
        };
        let node = Item::Node(Node {
            value: if value.is_null() { None } else { Some(value) },
            ext,
            ty: if is_res {
                value
                    .member("resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or(ty_owned)
            } else {
                ty_owned
            },
        });
        // One evaluation context for all of this element's constraints, made on first use.
        let (v, root, container) = (self.v, self.root, self.container);
        let mut ctx: Option<EvalContext<'v>> = None;
        for c in &def.constraints {
            // ele-1 and ext-1 are checked structurally above, dom-3 natively (it walks the whole resource).
            if c.key == "ele-1" || c.key == "ext-1" {
                continue;
            }
            if c.key == "dom-3" {
                self.dom3(value, path);
                continue;
            }
            // ref-1 (a local reference must resolve to a contained resource) is checked by `reference()`,
            // txt-1/txt-2 (htmlChecks) by the xhtml format check of the div.
            if c.key == "ref-1" || c.key == "txt-1" || c.key == "txt-2" {
                continue;
            }
            if let Some(holds) = dom_invariant(&c.key, &c.source, value) {
                if !holds {
                    self.invariant_failed(c, path);
                }
                continue;
            }
            let Some(expr) = &c.expr else {
                self.warn(
                    "invariant",
                    path,
                    &format!("制約 {} の式を解釈できません", c.key),
                    &format!("constraint {} could not be parsed: {}", c.key, c.source),
                );
                continue;
            };
            let ctx = ctx.get_or_insert_with(|| {
                let mut ctx = EvalContext::new(model)
                    .with_resource(resource)
                    .with_root(container.unwrap_or(resource));
                if root.member("resourceType").and_then(Value::as_str) == Some("Bundle") {
                    ctx = ctx.with_bundle(root);
                }
                ctx.terminology = Some(v.terminology);
                ctx.profiles = Some(v);
                ctx
            });
            match expr.evaluate_bool(ctx, vec![node.clone()]) {
                Ok(Some(false)) => self.invariant_failed(c, path),
                Ok(_) => {}
                Err(e) => self.issues.push(
                    Issue::new(
                        Severity::Warning,
                        "invariant",
                        path,
                        format!("制約 {} を評価できません", c.key),
                        format!("constraint {} could not be evaluated: {e}", c.key),
                    )
                    .with_rule(c.key.clone()),
                ),
            }
        }
    }
}

/// The DomainResource invariants every resource carries (dom-2, dom-4, dom-5, dom-6), decided
/// on the JSON without the FHIRPath engine: a JP-CLINS bundle holds some twenty resources, so
/// these four were a fifth of the time its invariants took. `None` for any other constraint,
/// or one whose expression is not the base one. Each answer is what the expression gives for
/// contained resources of known types (tested against the engine over the examples and
/// mutations of them); an unknown type is an error of its own.
pub fn dom_invariant(key: &str, source: &str, resource: &Value) -> Option<bool> {
    let contained = || nodes(resource.member("contained"));
    let contained_meta = move || contained().flat_map(|c| nodes(c.member("meta")));
    Some(match (key, source) {
        ("dom-2", "contained.contained.empty()") => {
            !contained().any(|c| has(c, "contained", false))
        }
        ("dom-4", "contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()") => {
            !contained_meta().any(|m| has(m, "versionId", true) || has(m, "lastUpdated", true))
        }
        ("dom-5", "contained.meta.security.empty()") => {
            !contained_meta().any(|m| has(m, "security", false))
        }
        ("dom-6", "text.`div`.exists()") => {
            nodes(resource.member("text")).any(|t| has(t, "div", true))
        }
        _ => return None,
    })
}

/// The items FHIRPath navigation yields for a JSON value: an array's non-null members, or the
/// value itself.
fn nodes(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    let (one, many) = match v {
        Some(Value::Array(a)) => (None, a.as_slice()),
        Some(x) => (Some(x), &[][..]),
        None => (None, &[][..]),
    };
    one.into_iter().chain(many.iter().filter(|x| !x.is_null()))
}

/// True when navigating to `name` in `v` yields something; a primitive's `_name` counts.
fn has(v: &Value, name: &str, primitive: bool) -> bool {
    let Some(map) = v.as_object() else {
        return false;
    };
    let ext = if primitive {
        json::underscored(map, name)
    } else {
        None
    };
    match (json::field(map, name), ext) {
        (Some(Value::Array(vs)), ext) => {
            let exts = ext.and_then(Value::as_array);
            vs.iter().enumerate().any(|(i, x)| {
                !x.is_null() || exts.and_then(|e| e.get(i)).is_some_and(|e| !e.is_null())
            })
        }
        (None, Some(Value::Array(es))) => es.iter().any(|e| !e.is_null()),
        (Some(_), _) | (None, Some(_)) => true,
        (None, None) => false,
    }
}

/// Resolves a reference inside a Bundle (by `fullUrl`, or `Type/id` against the entries) or to a
/// contained resource of `resource`.
pub fn resolve_in<'a>(root: &'a Value, resource: &'a Value, r: &str) -> Option<&'a Value> {
    if let Some(id) = r.strip_prefix('#') {
        return json::member(resource, "contained")?
            .as_array()?
            .iter()
            .find(|c| json::member(c, "id").and_then(Value::as_str) == Some(id));
    }
    let entries = json::member(root, "entry")?.as_array()?;
    if let Some(e) = entries
        .iter()
        .find(|e| json::member(e, "fullUrl").and_then(Value::as_str) == Some(r))
    {
        return json::member(e, "resource");
    }
    let (rt, id) = {
        let mut parts = r.rsplit('/');
        let id = parts.next()?;
        let rt = parts.next()?;
        (rt, id)
    };
    entries
        .iter()
        .filter_map(|e| json::member(e, "resource"))
        .find(|res| {
            json::member(res, "resourceType").and_then(Value::as_str) == Some(rt)
                && json::member(res, "id").and_then(Value::as_str) == Some(id)
        })
}

/// Local references (`#id`) anywhere in a resource outside `contained`.
fn collect_refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "contained" {
                    continue;
                }
                if let Value::String(s) = x {
                    if s.starts_with('#')
                        && (k == "reference"
                            || k.starts_with("value")
                            || k == "url"
                            || k == "profile")
                    {
                        out.push(s.as_str());
                    }
                } else {
                    collect_refs(x, out);
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                collect_refs(x, out);
            }
        }
        _ => {}
    }
}

/// Where a code sits relative to the element being checked.
#[derive(Clone, Copy)]
enum CodePath {
    /// The element is the code.
    Here,
    /// `.code` of a Coding or Quantity.
    Code,
    /// `.coding[i].code` of a CodeableConcept.
    CodingCode(usize),
}

impl CodePath {
    fn render(self, path: &str) -> String {
        match self {
            CodePath::Here => path.to_string(),
            CodePath::Code => format!("{path}.code"),
            CodePath::CodingCode(i) => format!("{path}.coding[{i}].code"),
        }
    }
}

fn coding_of(c: &Value, at: CodePath) -> Option<(Option<&str>, &str, CodePath)> {
    let code = c.member("code").and_then(Value::as_str)?;
    Some((c.member("system").and_then(Value::as_str), code, at))
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::{literal_type, sent_as_modifier};

    #[test]
    fn literal_references_name_their_type() {
        let cases = [
            ("Patient/123", Some("Patient")),
            ("Patient/123/_history/2", Some("Patient")),
            (
                "https://example.jp/fhir/Organization/9",
                Some("Organization"),
            ),
            (
                "https://example.jp/fhir/Organization/9/_history/1",
                Some("Organization"),
            ),
            ("#c1", None),
            ("urn:uuid:0b6d4b5e-6f11-4d8a-9c1e-1f0f6a6d0c11", None),
            ("123", None),
            ("Patient/", None),
            ("patient/123", None),
            ("", None),
        ];
        for (r, want) in cases {
            assert_eq!(literal_type(r), want, "{r}");
        }
    }

    /// Unknown profile URLs (they come from input) are not remembered; a known one is compiled
    /// once, however many threads ask for it at the same moment.
    #[test]
    fn profiles_are_compiled_once_and_unknown_urls_not_kept() {
        use crate::terminology::Terminology;
        use crate::Registry;
        let v = super::Validator::new(Registry::builtin(), Terminology::builtin());
        for i in 0..100 {
            assert!(v
                .profile(&format!(
                    "http://example.jp/fhir/StructureDefinition/unknown-{i}"
                ))
                .is_none());
        }
        let cached = || v.profiles.read().map(|m| m.len()).unwrap_or(usize::MAX);
        assert_eq!(cached(), 0);
        let url = "http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Patient_eCS";
        let got: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| v.profile(url))).collect();
            handles
                .into_iter()
                .map(|h| h.join().ok().flatten())
                .collect()
        });
        let first = got[0].clone().unwrap_or_else(|| panic!("{url} compiles"));
        assert!(got.iter().all(|p| p
            .as_ref()
            .is_some_and(|p| std::sync::Arc::ptr_eq(p, &first))));
        assert_eq!(cached(), 1);
    }

    #[test]
    fn modifier_extensions_are_told_by_their_path() {
        assert!(sent_as_modifier("Condition.modifierExtension[0]"));
        assert!(sent_as_modifier(
            "Bundle.entry[1].resource.modifierExtension[2]"
        ));
        assert!(!sent_as_modifier("Condition.extension[0]"));
        assert!(!sent_as_modifier("Condition.code.extension[0]"));
    }
}
