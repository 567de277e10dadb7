//! Registering submissions.
//!
//! A submission is a JP_Bundle_CLINS (傷病名, アレルギー or 検査 bundle), a document Bundle (診療情報提供書,
//! 退院時サマリー, 健診結果報告書), a collection of a referral with the discharge summaries attached to
//! it, or a prescription (MedicationRequest, from the e-prescription side: JP_Bundle_CLINS carries no
//! prescriptions). It is:
//!
//! 1. size-checked (10 MB), parsed, validated against JP-CLINS (errors: 422, nothing stored);
//! 2. attributed: the bundle identifier `医療機関番号^年^ID` names the institution, which must be the
//!    caller's (the policy decides) and every item's own institution number;
//! 3. matched to a person through the insured-person identifier and the person index;
//! 4. split into items — each made self-contained (what it refers to inside the Bundle is copied
//!    in as `contained`), pointed at the person, tagged with its facts;
//! 5. stored in one transaction that also removes whatever the same bundle identifier registered
//!    before: re-sending replaces, atomically.

use std::collections::{BTreeMap, HashMap};

use kizuna_auth::Principal;
use kizuna_store::WriteOp;
use serde_json::{json, Value};

use crate::identity::{MemberId, MEMBER_ID_SYSTEM};
use crate::item::*;
use crate::policy::{AccessContext, Request};
use crate::{item_target, ShareError, ShareService};

/// The resource types an item (or a document) is stored as.
pub const ITEM_TYPES: [&str; 5] = [
    "Condition",
    "AllergyIntolerance",
    "Observation",
    "MedicationRequest",
    "Bundle",
];

/// The extension carrying an item's institution number in JP-CLINS.
const INSTITUTION_EXT: &str =
    "http://jpfhir.jp/fhir/clins/Extension/StructureDefinition/JP_eCS_InstitutionNumber";

/// What a submission did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SubmissionReport {
    /// The bundle identifier (or the prescription's).
    pub identifier: String,
    /// The person the items belong to.
    pub person: String,
    /// Items stored, by kind code.
    pub stored: BTreeMap<String, usize>,
    /// Resources of an earlier submission with the same identifier that were replaced.
    pub replaced: usize,
    /// The document waiting in an inbox, for referrals and discharge summaries.
    pub inbox_document: Option<String>,
}

/// `meta.source` of everything one submission stored.
pub fn source_uri(identifier: &str) -> String {
    format!(
        "urn:kizuna:submission:{}",
        identifier.replace('%', "%25").replace('^', "%5E")
    )
}

/// The institution number at the front of a bundle identifier `医療機関番号^年^ID`.
fn institution_of(identifier: &str) -> Option<&str> {
    let mut parts = identifier.split('^');
    let inst = parts.next()?;
    let (year, id) = (parts.next()?, parts.next()?);
    (inst.len() == 10
        && inst.bytes().all(|b| b.is_ascii_digit())
        && year.len() == 4
        && !id.is_empty()
        && parts.next().is_none())
    .then_some(inst)
}

fn entries(b: &Value) -> &[Value] {
    b.get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn institution_ext(r: &Value) -> Option<&str> {
    r.get("extension")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(INSTITUTION_EXT))?
        .pointer("/valueIdentifier/value")
        .and_then(Value::as_str)
}

fn identifier_in(r: &Value, system: &str) -> Option<String> {
    r.get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(r.get("identifier").filter(|v| v.is_object()))
        .find(|i| i.get("system").and_then(Value::as_str) == Some(system))
        .and_then(|i| i.get("value").and_then(Value::as_str))
        .map(str::to_string)
}

/// A Bundle's resources by `fullUrl`, built once per Bundle for [`self_contained`].
fn by_full_url(bundle: &Value) -> HashMap<&str, &Value> {
    entries(bundle)
        .iter()
        .filter_map(|e| Some((e.get("fullUrl")?.as_str()?, e.get("resource")?)))
        .collect()
}

/// Makes an entry's resource self-contained: references to other entries of the Bundle become
/// `contained` copies (`#c1` …), references to the Patient point at the person. What the copies
/// (and the item's own contained resources) refer to is copied too, each entry once, so no stored
/// item keeps a `urn:uuid:` reference that only meant something inside the Bundle; a reference
/// back to the item itself becomes `#`, as FHIR writes a contained resource's link to its container.
fn self_contained(
    r: &Value,
    by_url: &HashMap<&str, &Value>,
    patient_urls: &[String],
    person: &str,
) -> Value {
    let mut out = r.clone();
    // The item's own contained resources are moved out while references are rewritten (the walk
    // skips `contained`) and put back in their place after, not copied a second time.
    // Validation has refused a `contained` that is not an array; such a value is not taken.
    let own = match out.get_mut("contained") {
        Some(Value::Array(a)) => Some(std::mem::take(a)),
        _ => None,
    };
    let had_array = own.is_some();
    let own = own.unwrap_or_default();
    let mut copier = Copier {
        by_url,
        container: r,
        patient_urls,
        person,
        used: own
            .iter()
            .filter_map(|c| c.get("id").and_then(Value::as_str))
            .map(str::to_string)
            .collect(),
        contained: own,
        copied: HashMap::new(),
    };
    copier.walk(&mut out);
    // Copies added while walking are walked in turn; `copied` keeps a cycle to one copy each.
    let mut i = 0;
    while i < copier.contained.len() {
        let mut c = std::mem::take(&mut copier.contained[i]);
        copier.walk(&mut c);
        copier.contained[i] = c;
        i += 1;
    }
    if had_array || !copier.contained.is_empty() {
        out["contained"] = Value::Array(copier.contained);
    }
    out
}

/// The state of one [`self_contained`] run.
struct Copier<'b, 'p> {
    by_url: &'b HashMap<&'b str, &'b Value>,
    /// The entry's resource, to tell a reference back to it.
    container: &'b Value,
    patient_urls: &'p [String],
    person: &'p str,
    /// The item's contained resources: its own, then the copies.
    contained: Vec<Value>,
    /// Local id of each entry copied, by `fullUrl`.
    copied: HashMap<String, String>,
    /// Ids taken in `contained` (the item's own may already use `cN`).
    used: std::collections::HashSet<String>,
}

impl Copier<'_, '_> {
    fn walk(&mut self, v: &mut Value) {
        match v {
            Value::Object(o) => {
                // A scan of the few keys, not a SipHash lookup in every object of every resource;
                // the object's own reference still comes before its children's.
                let own = o
                    .iter_mut()
                    .find(|(k, _)| *k == "reference")
                    .map(|(_, r)| r);
                if let Some(Value::String(rf)) = own {
                    if self.patient_urls.iter().any(|u| u == rf) {
                        *rf = format!("Patient/{}", self.person);
                    } else if let Some(target) = self.by_url.get(rf.as_str()).copied() {
                        *rf = if std::ptr::eq(target, self.container) {
                            "#".to_string()
                        } else {
                            format!("#{}", self.local_copy(rf, target))
                        };
                    }
                }
                for (k, x) in o.iter_mut() {
                    if k != "contained" {
                        self.walk(x);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.walk(x)),
            _ => {}
        }
    }

    /// The local id of an entry's copy, made on first use. A contained resource may not contain
    /// others (dom-2), so what the entry itself contains joins the item's `contained` under new
    /// ids, and the copy's `#` references follow them.
    fn local_copy(&mut self, url: &str, target: &Value) -> String {
        if let Some(l) = self.copied.get(url) {
            return l.clone();
        }
        let l = self.fresh_id();
        self.copied.insert(url.to_string(), l.clone());
        let mut t = target.clone();
        let mut nested = Vec::new();
        if let Some(m) = t.as_object_mut() {
            // A contained resource carries no meta of its own here.
            m.shift_remove("meta");
            if let Some(Value::Array(a)) = m.shift_remove("contained") {
                nested = a;
            }
        }
        t["id"] = json!(l);
        if !nested.is_empty() {
            // `#` meant the entry itself; inside the item that is the copy.
            let mut renamed = HashMap::from([("#".to_string(), format!("#{l}"))]);
            for n in nested.iter_mut() {
                let id = self.fresh_id();
                if let Some(old) = n.get("id").and_then(Value::as_str) {
                    renamed.insert(format!("#{old}"), format!("#{id}"));
                }
                n["id"] = json!(id);
            }
            for v in std::iter::once(&mut t).chain(nested.iter_mut()) {
                rename_local(v, &renamed);
            }
        }
        self.contained.push(t);
        self.contained.append(&mut nested);
        l
    }

    /// The next `cN` not used in the item.
    fn fresh_id(&mut self) -> String {
        let mut n = self.copied.len() + 1;
        loop {
            let l = format!("c{n}");
            if self.used.insert(l.clone()) {
                return l;
            }
            n += 1;
        }
    }
}

/// Rewrites local references (`#id`) by a table of old to new.
fn rename_local(v: &mut Value, renamed: &HashMap<String, String>) {
    kizuna_fhir::for_each_reference(v, &mut |r| {
        if let Some(n) = renamed.get(r.as_str()) {
            *r = n.clone();
        }
    });
}

/// Tags an item with its facts and provenance.
fn tag_item(
    r: &mut Value,
    kind: ItemKind,
    person: &str,
    institution: &str,
    source: &str,
    now: chrono::DateTime<chrono::Utc>,
) {
    r["id"] = json!(kizuna_store::new_id());
    set_tag(r, TAG_ITEM, kind.code());
    set_tag(r, TAG_PERSON, person);
    set_tag(r, TAG_INSTITUTION, institution);
    r["meta"]["source"] = json!(source);
    set_instant(r, EXT_REGISTERED, now);
}

/// The Patient entries of a Bundle: their fullUrls and the insured-person identifier they carry.
fn patient_of(b: &Value) -> Result<(Vec<String>, MemberId), ShareError> {
    let mut urls = Vec::new();
    let mut member = None;
    for (i, e) in entries(b).iter().enumerate() {
        let Some(r) = e.get("resource") else { continue };
        if r.get("resourceType").and_then(Value::as_str) != Some("Patient") {
            continue;
        }
        if let Some(u) = e.get("fullUrl").and_then(Value::as_str) {
            urls.push(u.to_string());
        }
        if let Some(id) = r.get("id").and_then(Value::as_str) {
            urls.push(format!("Patient/{id}"));
        }
        if member.is_none() {
            if let Some(text) = identifier_in(r, MEMBER_ID_SYSTEM) {
                member = Some(MemberId::parse(&text).map_err(|err| {
                    ShareError::invalid(
                        format!("Bundle.entry[{i}].resource.identifier"),
                        err.to_string(),
                        err.to_string(),
                    )
                })?);
            }
        }
    }
    let member = member.ok_or_else(|| {
        ShareError::invalid(
            "Bundle.entry.resource.ofType(Patient).identifier",
            "患者の被保険者番号 (JP_Insurance_memberID) がありません",
            "the Patient has no insured-person identifier (JP_Insurance_memberID)",
        )
    })?;
    Ok((urls, member))
}

/// Institution numbers of the Organizations a Composition section lists (`910` 紹介先情報).
fn section_institutions(b: &Value, section_code: &str) -> Vec<String> {
    let by_url: HashMap<&str, &Value> = entries(b)
        .iter()
        .filter_map(|e| Some((e.get("fullUrl")?.as_str()?, e.get("resource")?)))
        .collect();
    let Some(comp) = entries(b)
        .iter()
        .filter_map(|e| e.get("resource"))
        .find(|r| r.get("resourceType").and_then(Value::as_str) == Some("Composition"))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in comp
        .get("section")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let code_matches = s
            .pointer("/code/coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| c.get("code").and_then(Value::as_str) == Some(section_code));
        if !code_matches {
            continue;
        }
        for e in s
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let target = e
                .get("reference")
                .and_then(Value::as_str)
                .and_then(|r| by_url.get(r));
            if let Some(org) = target {
                if org.get("resourceType").and_then(Value::as_str) == Some("Organization") {
                    out.extend(identifier_in(org, INSTITUTION_SYSTEM));
                }
            }
        }
    }
    out
}

/// The insurer of a check-up report: the insurer Organization's 保険者番号.
fn checkup_insurer(b: &Value) -> Option<String> {
    entries(b)
        .iter()
        .filter_map(|e| e.get("resource"))
        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Organization"))
        .find_map(|r| identifier_in(r, INSURER_SYSTEM))
}

/// A document's submitting institution, when it names one (Composition.custodian).
fn custodian_institution(b: &Value) -> Option<String> {
    let comp = entries(b)
        .iter()
        .filter_map(|e| e.get("resource"))
        .find(|r| r.get("resourceType").and_then(Value::as_str) == Some("Composition"))?;
    let rf = comp
        .pointer("/custodian/reference")
        .and_then(Value::as_str)?;
    let org = entries(b)
        .iter()
        .find(|e| e.get("fullUrl").and_then(Value::as_str) == Some(rf))?
        .get("resource")?;
    identifier_in(org, INSTITUTION_SYSTEM)
}

impl ShareService {
    fn validate_or_refuse(&self, r: &Value) -> Result<(), ShareError> {
        let oo = self.validator().validate(r);
        if oo.has_errors() {
            let mut oo = oo;
            oo.issues
                .retain(|i| i.severity <= kizuna_fhir::outcome::Severity::Error);
            return Err(ShareError::Validation(oo));
        }
        Ok(())
    }

    /// Registers one submission (see the module documentation); `destination` names the institution
    /// a discharge summary sent on its own goes to.
    pub async fn submit(
        &self,
        p: &Principal,
        body: &[u8],
        destination: Option<&str>,
    ) -> Result<SubmissionReport, ShareError> {
        if body.len() > self.config().max_submission_bytes {
            return Err(ShareError::TooLarge(self.config().max_submission_bytes));
        }
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            ShareError::invalid(
                "",
                format!("JSON が不正です: {e}"),
                format!("invalid JSON: {e}"),
            )
        })?;
        match v.get("resourceType").and_then(Value::as_str) {
            Some("MedicationRequest") => self.submit_prescription(p, v).await,
            Some("Bundle") => self.submit_bundle(p, v, destination).await,
            _ => Err(ShareError::invalid(
                "resourceType",
                "Bundle か MedicationRequest が必要です",
                "expected a Bundle or a MedicationRequest",
            )),
        }
    }

    /// The submitting institution, checked by the policy.
    fn authorise_submission(&self, p: &Principal, identifier: &str) -> Result<String, ShareError> {
        let inst = institution_of(identifier).ok_or_else(|| {
            ShareError::invalid(
                "Bundle.identifier.value",
                "Bundle の識別子は 医療機関番号^年^ID です",
                "the bundle identifier must be 医療機関番号^年^ID",
            )
        })?;
        let d = self.check(
            p,
            &Request::Submit { institution: inst },
            &AccessContext::default(),
            "submit",
            kizuna_audit::Target::default(),
        );
        if !d.allowed {
            return Err(ShareError::Denied(d.rule));
        }
        Ok(inst.to_string())
    }

    async fn submit_bundle(
        &self,
        p: &Principal,
        b: Value,
        destination: Option<&str>,
    ) -> Result<SubmissionReport, ShareError> {
        let identifier = b
            .get("identifier")
            .filter(|i| i.get("system").and_then(Value::as_str) == Some(BUNDLE_ID_SYSTEM))
            .and_then(|i| i.get("value").and_then(Value::as_str))
            .ok_or_else(|| {
                ShareError::invalid(
                    "Bundle.identifier",
                    format!("Bundle.identifier ({BUNDLE_ID_SYSTEM}) がありません"),
                    format!("Bundle.identifier ({BUNDLE_ID_SYSTEM}) is missing"),
                )
            })?
            .to_string();
        let inst = self.authorise_submission(p, &identifier)?;
        let now = self.now();
        let source = source_uri(&identifier);
        let clins = b
            .pointer("/meta/profile")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|p| p.contains("JP_Bundle_CLINS"));
        // A referral with its discharge summaries: a collection whose entries are documents.
        let package: Vec<Value> = if b.get("type").and_then(Value::as_str) == Some("collection")
            && !clins
            && !entries(&b).is_empty()
            && entries(&b).iter().all(|e| {
                e.pointer("/resource/resourceType").and_then(Value::as_str) == Some("Bundle")
            }) {
            entries(&b)
                .iter()
                .filter_map(|e| e.get("resource").cloned())
                .collect()
        } else {
            Vec::new()
        };
        let mut writes: Vec<Value> = Vec::new();
        let mut inbox_document = None;
        let person;
        if clins {
            let t = std::time::Instant::now();
            // The person is looked up while the bundle is validated (the lookup waits on a
            // reader, validation on this task); a validation failure is still the answer first.
            let patient = patient_of(&b);
            let resolving = async {
                match &patient {
                    Ok((_, member)) => self.resolve_member(member).await.map(Some),
                    Err(_) => Ok(None),
                }
            };
            let validating = async { self.validate_or_refuse(&b) };
            let (resolved, valid) = tokio::join!(biased; resolving, validating);
            valid?;
            let (patient_urls, _) = patient?;
            person = resolved?.flatten().ok_or(ShareError::UnknownMember)?;
            tracing::debug!(
                validate_and_resolve_us = t.elapsed().as_micros() as u64,
                "submit stages"
            );
            let urls = by_full_url(&b);
            for (i, e) in entries(&b).iter().enumerate() {
                let Some(r) = e.get("resource") else { continue };
                let Some(kind) = classify(r) else { continue };
                if kind == ItemKind::Prescription {
                    return Err(ShareError::invalid(
                        format!("Bundle.entry[{i}].resource"),
                        "JP_Bundle_CLINS に処方は含められません",
                        "a JP_Bundle_CLINS cannot carry prescriptions",
                    ));
                }
                if let Some(own) = institution_ext(r) {
                    if own != inst {
                        return Err(ShareError::invalid(
                            format!("Bundle.entry[{i}].resource.extension"),
                            "項目の医療機関番号が Bundle の識別子と違います",
                            "the item's institution number differs from the bundle identifier's",
                        ));
                    }
                }
                let mut item = self_contained(r, &urls, &patient_urls, &person);
                tag_item(&mut item, kind, &person, &inst, &source, now);
                writes.push(item);
            }
        } else if !package.is_empty() {
            for d in &package {
                self.validate_or_refuse(d)?;
            }
            let referral = package
                .iter()
                .find(|d| document_kind(d) == Some(ItemKind::Referral))
                .ok_or_else(|| {
                    ShareError::invalid(
                        "Bundle.entry",
                        "添付の束には診療情報提供書が 1 通必要です",
                        "a package needs one referral (診療情報提供書)",
                    )
                })?;
            let (referral_doc, mut extracted, p2) = self
                .document_items(referral, ItemKind::Referral, &inst, &source, now, None)
                .await?;
            person = p2;
            let dest = referral_doc.0.clone().unwrap_or_default();
            let ref_id = referral_doc.1["id"].as_str().unwrap_or("").to_string();
            inbox_document = Some(format!("Bundle/{ref_id}"));
            writes.push(referral_doc.1);
            writes.append(&mut extracted);
            for d in package.iter().filter(|d| !std::ptr::eq(*d, referral)) {
                if document_kind(d) != Some(ItemKind::DischargeSummary) {
                    return Err(ShareError::invalid(
                        "Bundle.entry",
                        "添付できるのは退院時サマリーです",
                        "only discharge summaries can be attached to a referral",
                    ));
                }
                let (doc, mut items, _) = self
                    .document_items(
                        d,
                        ItemKind::DischargeSummary,
                        &inst,
                        &source,
                        now,
                        Some(&dest),
                    )
                    .await?;
                let mut doc = doc.1;
                set_tag(&mut doc, TAG_ATTACHED_TO, &ref_id);
                writes.push(doc);
                writes.append(&mut items);
            }
        } else {
            let kind = document_kind(&b).ok_or_else(|| {
                ShareError::invalid(
                    "Bundle.meta.profile",
                    "JP_Bundle_CLINS か文書 (診療情報提供書・退院時サマリー・健診結果報告書) の Bundle が必要です",
                    "expected a JP_Bundle_CLINS or a document Bundle (referral, discharge summary, check-up report)",
                )
            })?;
            self.validate_or_refuse(&b)?;
            let (doc, mut items, p2) = self
                .document_items(&b, kind, &inst, &source, now, destination)
                .await?;
            person = p2;
            let (dest, doc) = doc;
            let doc_id = doc["id"].as_str().unwrap_or("").to_string();
            if kind == ItemKind::DischargeSummary {
                // Sent on its own: the service writes a cover letter to the destination.
                let dest = dest.ok_or_else(|| {
                    ShareError::invalid(
                        "destination",
                        "単独の退院時サマリーには送付先 (destination) が必要です",
                        "a discharge summary sent on its own needs a destination",
                    )
                })?;
                let cover = self.cover_referral(&doc_id, &person, &inst, &dest, &source, now);
                inbox_document = cover["id"].as_str().map(|i| format!("Bundle/{i}"));
                let mut doc = doc;
                if let Some(c) = cover["id"].as_str() {
                    set_tag(&mut doc, TAG_ATTACHED_TO, c);
                }
                writes.push(cover);
                writes.push(doc);
            } else {
                if kind == ItemKind::Referral {
                    inbox_document = Some(format!("Bundle/{doc_id}"));
                }
                writes.push(doc);
            }
            writes.append(&mut items);
        }
        self.store_submission(p, &identifier, &source, &person, writes, inbox_document)
            .await
    }

    /// A document and the six items it carries (never prescriptions): the stored document with its
    /// destination, the extracted items, and the person.
    async fn document_items(
        &self,
        b: &Value,
        kind: ItemKind,
        inst: &str,
        source: &str,
        now: chrono::DateTime<chrono::Utc>,
        destination: Option<&str>,
    ) -> Result<((Option<String>, Value), Vec<Value>, String), ShareError> {
        if let Some(c) = custodian_institution(b) {
            if c != inst {
                return Err(ShareError::invalid(
                    "Composition.custodian",
                    "文書の作成機関が Bundle の識別子と違います",
                    "the document's custodian differs from the bundle identifier's institution",
                ));
            }
        }
        let (patient_urls, member) = patient_of(b)?;
        let person = self
            .resolve_member(&member)
            .await?
            .ok_or(ShareError::UnknownMember)?;
        let mut doc = b.clone();
        tag_item(&mut doc, kind, &person, inst, source, now);
        let mut dest = destination.map(str::to_string);
        match kind {
            ItemKind::Referral => {
                let named = section_institutions(b, "910");
                let d = named.into_iter().next().ok_or_else(|| {
                    ShareError::invalid(
                        "Composition.section.where(code.coding.code='910').entry",
                        "診療情報提供書には紹介先の医療機関 (医療機関番号) が必要です",
                        "a referral must name its destination institution (医療機関番号)",
                    )
                })?;
                dest = Some(d);
            }
            ItemKind::Checkup => {
                let ins = checkup_insurer(b).ok_or_else(|| {
                    ShareError::invalid(
                        "Bundle.entry.resource.ofType(Organization).identifier",
                        "健診結果報告書に保険者番号がありません",
                        "the check-up report names no insurer (保険者番号)",
                    )
                })?;
                set_tag(&mut doc, TAG_INSURER, &ins);
            }
            _ => {}
        }
        if let Some(d) = &dest {
            if kind != ItemKind::Checkup {
                set_tag(&mut doc, TAG_DESTINATION, d);
                set_tag(&mut doc, TAG_INBOX, "pending");
            }
        }
        // The six items inside a referral or discharge summary are registered too; prescriptions
        // are not taken from documents, and check-up results stay in their report.
        let mut items = Vec::new();
        if matches!(kind, ItemKind::Referral | ItemKind::DischargeSummary) {
            let urls = by_full_url(b);
            for e in entries(b) {
                let Some(r) = e.get("resource") else { continue };
                match classify(r) {
                    Some(ItemKind::Prescription) | None => {}
                    Some(k) => {
                        let mut item = self_contained(r, &urls, &patient_urls, &person);
                        tag_item(&mut item, k, &person, inst, source, now);
                        items.push(item);
                    }
                }
            }
        }
        Ok(((dest, doc), items, person))
    }

    /// The cover letter (送付状) for a discharge summary sent on its own: a minimal document addressed
    /// to the destination, referring to the summary.
    fn cover_referral(
        &self,
        summary_id: &str,
        person: &str,
        inst: &str,
        dest: &str,
        source: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Value {
        let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut cover = json!({
            "resourceType": "Bundle",
            "type": "document",
            "timestamp": stamp,
            "entry": [{
                "fullUrl": "urn:uuid:cover-composition",
                "resource": {
                    "resourceType": "Composition",
                    "status": "final",
                    "type": {"coding": [{"system": "http://jpfhir.jp/fhir/Common/CodeSystem/doc-typecodes", "code": "57133-1", "display": "診療情報提供書"}]},
                    "title": "送付状 (退院時サマリー) / cover letter (discharge summary)",
                    "subject": {"reference": format!("Patient/{person}")},
                    "date": stamp,
                    "author": [{"identifier": {"system": INSTITUTION_SYSTEM, "value": inst}}],
                    "section": [
                        {"title": "紹介先情報", "code": {"coding": [{"code": "910"}]}, "entry": [{"identifier": {"system": INSTITUTION_SYSTEM, "value": dest}}]},
                        {"title": "添付 / attachment", "entry": [{"reference": format!("Bundle/{summary_id}")}]}
                    ]
                }
            }]
        });
        tag_item(&mut cover, ItemKind::Referral, person, inst, source, now);
        set_tag(&mut cover, TAG_DESTINATION, dest);
        set_tag(&mut cover, TAG_INBOX, "pending");
        cover
    }

    async fn submit_prescription(
        &self,
        p: &Principal,
        mut r: Value,
    ) -> Result<SubmissionReport, ShareError> {
        let inst = institution_ext(&r)
            .ok_or_else(|| {
                ShareError::invalid(
                    "MedicationRequest.extension",
                    "処方に医療機関番号 (JP_eCS_InstitutionNumber) がありません",
                    "the prescription names no institution (JP_eCS_InstitutionNumber)",
                )
            })?
            .to_string();
        let rid = identifier_in(
            &r,
            "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier",
        )
        .ok_or_else(|| {
            ShareError::invalid(
                "MedicationRequest.identifier",
                "処方の識別子 (resourceInstance-identifier) がありません",
                "the prescription has no resourceInstance-identifier",
            )
        })?;
        let year = r
            .get("authoredOn")
            .and_then(Value::as_str)
            .and_then(|a| a.get(..4))
            .unwrap_or("0000")
            .to_string();
        let identifier = format!("{inst}^{year}^RX{rid}");
        self.authorise_submission(p, &identifier)?;
        self.validate_or_refuse(&r)?;
        let member = r
            .pointer("/subject/identifier")
            .filter(|i| i.get("system").and_then(Value::as_str) == Some(MEMBER_ID_SYSTEM))
            .and_then(|i| i.get("value").and_then(Value::as_str))
            .ok_or_else(|| {
                ShareError::invalid(
                    "MedicationRequest.subject.identifier",
                    "処方の患者 (被保険者番号) がありません",
                    "the prescription names no patient (insured-person identifier)",
                )
            })?;
        let member = MemberId::parse(member).map_err(|e| {
            ShareError::invalid(
                "MedicationRequest.subject.identifier",
                e.to_string(),
                e.to_string(),
            )
        })?;
        let person = self
            .resolve_member(&member)
            .await?
            .ok_or(ShareError::UnknownMember)?;
        r["subject"] = json!({"reference": format!("Patient/{person}")});
        let source = source_uri(&identifier);
        tag_item(
            &mut r,
            ItemKind::Prescription,
            &person,
            &inst,
            &source,
            self.now(),
        );
        self.store_submission(p, &identifier, &source, &person, vec![r], None)
            .await
    }

    /// The ids of everything a submission stored.
    pub(crate) async fn submission_contents(
        &self,
        source: &str,
    ) -> Result<Vec<(String, String)>, ShareError> {
        // The five types in one statement: a submission waits for one reader, not five.
        let q = crate::lookup(&[("_source".into(), source.to_string())]);
        Ok(self.store().search_ids_in(&ITEM_TYPES, &q).await?)
    }

    async fn store_submission(
        &self,
        p: &Principal,
        identifier: &str,
        source: &str,
        person: &str,
        writes: Vec<Value>,
        inbox_document: Option<String>,
    ) -> Result<SubmissionReport, ShareError> {
        let _turn = self.identifier_turn(source).await;
        let t = std::time::Instant::now();
        let earlier = self.submission_contents(source).await?;
        let looked = t.elapsed();
        let replaced = earlier.len();
        let mut ops: Vec<WriteOp> = earlier
            .into_iter()
            .map(|(rt, id)| WriteOp::Delete {
                resource_type: rt,
                id,
            })
            .collect();
        let mut stored: BTreeMap<String, usize> = BTreeMap::new();
        let mut audit = Vec::with_capacity(writes.len());
        let time = self.now().to_rfc3339();
        for w in writes {
            let kind = tags(&w, TAG_ITEM).next().unwrap_or("").to_string();
            *stored.entry(kind).or_default() += 1;
            audit.push(kizuna_audit::NewEntry {
                time: time.clone(),
                actor: p.audit_actor(),
                action: "submit".into(),
                target: item_target(
                    w["resourceType"].as_str().unwrap_or(""),
                    w["id"].as_str().unwrap_or(""),
                    person,
                ),
                purpose: kizuna_audit::Purpose::Treatment,
                outcome: kizuna_audit::Outcome::allow("submitting-institution"),
                source: None,
                request: Some(source.to_string()),
            });
            ops.push(WriteOp::CreateWithId { resource: w });
        }
        self.store().transaction(ops).await?;
        let written = t.elapsed();
        self.audit_batch(audit);
        self.audit_durable().await;
        tracing::debug!(
            contents_us = looked.as_micros() as u64,
            write_us = (written - looked).as_micros() as u64,
            audit_us = (t.elapsed() - written).as_micros() as u64,
            "submit stages"
        );
        tracing::info!(
            items = stored.values().sum::<usize>(),
            replaced,
            "submission registered"
        );
        Ok(SubmissionReport {
            identifier: identifier.to_string(),
            person: person.to_string(),
            stored,
            replaced,
            inbox_document,
        })
    }

    /// Withdraws a submission: everything it stored is deleted (audited).
    pub async fn withdraw(&self, p: &Principal, identifier: &str) -> Result<usize, ShareError> {
        let inst = institution_of(identifier).ok_or_else(|| {
            ShareError::invalid(
                "identifier",
                "識別子は 医療機関番号^年^ID です",
                "the identifier must be 医療機関番号^年^ID",
            )
        })?;
        let d = self.check(
            p,
            &Request::Withdraw { institution: inst },
            &AccessContext::default(),
            "withdraw",
            kizuna_audit::Target::default(),
        );
        if !d.allowed {
            return Err(ShareError::Denied(d.rule));
        }
        let source = source_uri(identifier);
        let _turn = self.identifier_turn(&source).await;
        let contents = self.submission_contents(&source).await?;
        if contents.is_empty() {
            return Err(ShareError::NotFound(identifier.to_string()));
        }
        let n = contents.len();
        let ops = contents
            .iter()
            .map(|(rt, id)| WriteOp::Delete {
                resource_type: rt.clone(),
                id: id.clone(),
            })
            .collect();
        self.store().transaction(ops).await?;
        let time = self.now().to_rfc3339();
        self.audit_batch(
            contents
                .into_iter()
                .map(|(rt, id)| kizuna_audit::NewEntry {
                    time: time.clone(),
                    actor: p.audit_actor(),
                    action: "withdraw".into(),
                    target: kizuna_audit::Target {
                        resource_type: Some(rt),
                        resource_id: Some(id),
                        ..Default::default()
                    },
                    purpose: kizuna_audit::Purpose::Treatment,
                    outcome: kizuna_audit::Outcome::allow("submitting-institution"),
                    source: None,
                    request: Some(source.clone()),
                })
                .collect(),
        );
        self.audit_durable().await;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_identifiers_name_the_institution() {
        assert_eq!(
            institution_of("1313312187^2025^818249895632"),
            Some("1313312187")
        );
        assert_eq!(institution_of("131331218^2025^1"), None);
        assert_eq!(institution_of("1313312187^25^1"), None);
        assert_eq!(institution_of("1313312187^2025^"), None);
        assert_eq!(institution_of("1313312187^2025^1^2"), None);
    }

    #[test]
    fn entries_become_self_contained() {
        let b = json!({"entry": [
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"}},
            {"fullUrl": "urn:uuid:e", "resource": {"resourceType": "Encounter", "id": "e1", "meta": {"profile": ["x"]}, "subject": {"reference": "urn:uuid:p"}}},
            {"fullUrl": "urn:uuid:c", "resource": {"resourceType": "Condition", "subject": {"reference": "urn:uuid:p"}, "encounter": {"reference": "urn:uuid:e"}, "recorder": {"reference": "urn:uuid:e"}}}
        ]});
        let c = self_contained(
            &b["entry"][2]["resource"],
            &by_full_url(&b),
            &["urn:uuid:p".into()],
            "P1",
        );
        assert_eq!(c["subject"]["reference"], "Patient/P1");
        assert_eq!(c["encounter"]["reference"], "#c1");
        assert_eq!(c["recorder"]["reference"], "#c1", "one copy per target");
        assert_eq!(c["contained"].as_array().map(Vec::len), Some(1));
        assert_eq!(c["contained"][0]["subject"]["reference"], "Patient/P1");
        assert!(c["contained"][0].get("meta").is_none());
    }

    #[test]
    fn an_items_own_contained_resources_stay_in_place_and_keep_their_ids() {
        let b = json!({"entry": [
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"}},
            {"fullUrl": "urn:uuid:e", "resource": {"resourceType": "Encounter", "subject": {"reference": "urn:uuid:p"}}},
            {"fullUrl": "urn:uuid:o", "resource": {
                "resourceType": "Observation",
                "contained": [{"resourceType": "Specimen", "id": "c1", "subject": {"reference": "urn:uuid:p"}}],
                "status": "final",
                "subject": {"reference": "urn:uuid:p"},
                "encounter": {"reference": "urn:uuid:e"},
                "specimen": {"reference": "#c1"}
            }}
        ]});
        let urls = by_full_url(&b);
        let c = self_contained(
            &b["entry"][2]["resource"],
            &urls,
            &["urn:uuid:p".into()],
            "P1",
        );
        let keys = keys_of(&c);
        assert_eq!(
            keys,
            [
                "resourceType",
                "contained",
                "status",
                "subject",
                "encounter",
                "specimen"
            ]
        );
        assert_eq!(c["specimen"]["reference"], "#c1");
        assert_eq!(c["contained"][0]["resourceType"], "Specimen");
        assert_eq!(c["contained"][0]["subject"]["reference"], "Patient/P1");
        // The copy of the Encounter does not take the Specimen's id.
        assert_eq!(c["encounter"]["reference"], "#c2");
        assert_eq!(c["contained"][1]["id"], "c2");
        assert_eq!(c["contained"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn what_a_copied_entry_contains_joins_the_item_under_new_ids() {
        let b = json!({"entry": [
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"}},
            {"fullUrl": "urn:uuid:e", "resource": {"resourceType": "Encounter",
                "meta": {"profile": ["x"]},
                "contained": [
                    {"resourceType": "Location", "id": "c1", "managingOrganization": {"reference": "#"}},
                    {"resourceType": "Practitioner", "id": "dr"}
                ],
                "status": "finished",
                "location": [{"location": {"reference": "#c1"}}],
                "participant": [{"individual": {"reference": "#dr"}}],
                "subject": {"reference": "urn:uuid:p"}}},
            {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation",
                "contained": [{"resourceType": "Specimen", "id": "c2"}],
                "encounter": {"reference": "urn:uuid:e"},
                "specimen": {"reference": "#c2"}}}
        ]});
        let c = self_contained(
            &b["entry"][2]["resource"],
            &by_full_url(&b),
            &["urn:uuid:p".into()],
            "P1",
        );
        let contained = c["contained"].as_array().cloned().unwrap_or_default();
        let ids: Vec<&str> = contained.iter().filter_map(|x| x["id"].as_str()).collect();
        assert_eq!(ids, ["c2", "c1", "c3", "c4"], "{c}");
        assert_eq!(c["specimen"]["reference"], "#c2");
        assert_eq!(c["encounter"]["reference"], "#c1");
        let enc = &contained[1];
        assert!(enc.get("contained").is_none(), "no nested contained: {enc}");
        let keys = keys_of(enc);
        assert_eq!(
            keys,
            [
                "resourceType",
                "status",
                "location",
                "participant",
                "subject",
                "id"
            ]
        );
        assert_eq!(enc["location"][0]["location"]["reference"], "#c3");
        assert_eq!(enc["participant"][0]["individual"]["reference"], "#c4");
        assert_eq!(enc["subject"]["reference"], "Patient/P1");
        assert_eq!(contained[2]["resourceType"], "Location");
        // The Location's link to its container (the Encounter) still finds the Encounter.
        assert_eq!(contained[2]["managingOrganization"]["reference"], "#c1");
        assert_eq!(contained[3]["resourceType"], "Practitioner");
    }

    /// A JSON object's keys in order.
    fn keys_of(v: &Value) -> Vec<&String> {
        v.as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default()
    }

    /// Every `reference` string in a value, skipping nothing.
    fn references(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    match (k.as_str(), x) {
                        ("reference", Value::String(r)) => out.push(r.clone()),
                        _ => references(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| references(x, out)),
            _ => {}
        }
    }

    proptest::proptest! {
        /// Whatever the graph of references between a Bundle's entries (chains, cycles, links
        /// back, an item's own contained resources named like copies), a self-contained item
        /// keeps no Bundle-local reference, its contained ids are unique, every local reference
        /// finds exactly one of them, and each entry is copied at most once.
        #[test]
        fn self_contained_items_resolve_every_reference_locally(
            links in proptest::collection::vec(proptest::collection::vec(0usize..6, 0..4), 5),
            own_ids in proptest::collection::btree_set(1usize..5, 0..3),
            item in 1usize..5,
        ) {
            // Entry 0 is the Patient; entries 1..5 refer to the entries `links` names
            // (index 5 is a reference that is not in the Bundle).
            let mut entries = vec![json!({"fullUrl": "urn:uuid:e0", "resource": {"resourceType": "Patient"}})];
            for (i, to) in links.iter().enumerate().skip(1) {
                let refs: Vec<Value> = to
                    .iter()
                    .map(|t| json!({"valueReference": {"reference": format!("urn:uuid:e{t}")}}))
                    .collect();
                let mut r = json!({"resourceType": "Basic", "extension": refs});
                if i != item && i % 2 == 0 {
                    // An entry with a contained resource of its own, named like a copy.
                    r["contained"] = json!([{"resourceType": "Basic", "id": "c1", "code": {"text": format!("inner{i}")}, "subject": {"reference": "#"}}]);
                    r["subject"] = json!({"reference": "#c1"});
                    r["code"] = json!({"text": format!("outer{i}")});
                }
                if i == item && !own_ids.is_empty() {
                    r["contained"] = Value::Array(
                        own_ids
                            .iter()
                            .map(|n| json!({"resourceType": "Basic", "id": format!("c{n}"), "subject": {"reference": "urn:uuid:e0"}}))
                            .collect(),
                    );
                }
                entries.push(json!({"fullUrl": format!("urn:uuid:e{i}"), "resource": r}));
            }
            let b = json!({"entry": entries});
            let c = self_contained(&b["entry"][item]["resource"], &by_full_url(&b), &["urn:uuid:e0".into()], "P1");
            let mut refs = Vec::new();
            references(&c, &mut refs);
            let contained = c["contained"].as_array().cloned().unwrap_or_default();
            let ids: Vec<&str> = contained.iter().filter_map(|x| x["id"].as_str()).collect();
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            proptest::prop_assert_eq!(unique.len(), ids.len(), "{}", c);
            let own = own_ids.len();
            // At most the three other entries besides the Patient, once each, and what entries
            // 2 and 4 contain.
            proptest::prop_assert!(contained.len() <= own + 5, "{}", c);
            proptest::prop_assert!(contained.iter().all(|x| x.get("contained").is_none()), "nested: {}", c);
            for r in &refs {
                // Only the reference that was never in the Bundle stays as it was.
                proptest::prop_assert!(!r.starts_with("urn:uuid:") || r == "urn:uuid:e5", "{} in {}", r, c);
                if let Some(local) = r.strip_prefix('#') {
                    if !local.is_empty() {
                        proptest::prop_assert_eq!(ids.iter().filter(|i| **i == local).count(), 1, "{} in {}", r, c);
                    }
                }
            }
            // A copied entry's link to what it contained, and that resource's link back to its
            // container, still find each other.
            let by_id = |id: &str| contained.iter().find(|x| x["id"].as_str() == Some(id));
            for x in &contained {
                let (Some(text), Some(link)) = (x["code"]["text"].as_str(), x["subject"]["reference"].as_str()) else {
                    continue;
                };
                let other = link.strip_prefix('#').and_then(by_id);
                let want = match text.strip_prefix("outer") {
                    Some(i) => format!("inner{i}"),
                    None => format!("outer{}", text.trim_start_matches("inner")),
                };
                proptest::prop_assert_eq!(other.and_then(|o| o["code"]["text"].as_str()), Some(want.as_str()), "{} in {}", link, c);
            }
            // The Patient is never copied: references to it point at the person.
            let types: Vec<&str> = contained.iter().filter_map(|x| x["resourceType"].as_str()).collect();
            proptest::prop_assert!(types.iter().all(|t| *t == "Basic"), "{}", c);
        }
    }

    #[test]
    fn what_copies_refer_to_is_copied_once_and_a_link_back_is_hash() {
        let b = json!({"entry": [
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"}},
            {"fullUrl": "urn:uuid:org", "resource": {"resourceType": "Organization", "extension": [
                {"url": "x", "valueReference": {"reference": "urn:uuid:e"}}
            ]}},
            {"fullUrl": "urn:uuid:e", "resource": {"resourceType": "Encounter",
                "subject": {"reference": "urn:uuid:p"},
                "serviceProvider": {"reference": "urn:uuid:org"},
                "extension": [{"url": "y", "valueReference": {"reference": "urn:uuid:o"}}]}},
            {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation",
                "subject": {"reference": "urn:uuid:p"},
                "encounter": {"reference": "urn:uuid:e"},
                "performer": [{"reference": "urn:uuid:org"}]}}
        ]});
        let c = self_contained(
            &b["entry"][3]["resource"],
            &by_full_url(&b),
            &["urn:uuid:p".into()],
            "P1",
        );
        let text = c.to_string();
        assert!(!text.contains("urn:uuid:"), "{text}");
        assert_eq!(c["encounter"]["reference"], "#c1");
        assert_eq!(c["performer"][0]["reference"], "#c2");
        let contained = c["contained"].as_array().cloned().unwrap_or_default();
        assert_eq!(contained.len(), 2, "each entry copied once: {text}");
        let enc = &contained[0];
        assert_eq!(enc["resourceType"], "Encounter");
        assert_eq!(enc["subject"]["reference"], "Patient/P1");
        assert_eq!(enc["serviceProvider"]["reference"], "#c2");
        // The Encounter's link back to the Observation is a link to the container.
        assert_eq!(enc["extension"][0]["valueReference"]["reference"], "#");
        let org = &contained[1];
        assert_eq!(org["resourceType"], "Organization");
        assert_eq!(org["extension"][0]["valueReference"]["reference"], "#c1");
    }
}
