//! How a generated population reaches the sharing service, shared by `kizuna demo` and
//! `kizuna bench share`: eligibility bundles for `Coverage/$import-eligibility`, and every
//! submission with the institution that sends it.

use kizuna_synth::clinical::BundleKind;
use kizuna_synth::PersonOutput;
use serde_json::Value;

/// One `$submit` call as the sending institution's system makes it.
pub struct Submission {
    /// What it carries.
    pub kind: BundleKind,
    /// The sending institution (医療機関番号).
    pub from: String,
    /// The request body.
    pub body: String,
    /// The destination of a discharge summary sent on its own.
    pub destination: Option<String>,
    /// Resources it carries, counted when it is made (a benchmark's clients do not parse what
    /// they send while the clock runs).
    pub resources: u64,
}

/// The sending institution of a generated submission: the first part of the bundle identifier
/// (`医療機関番号^年^ID`), or the prescribing institution of a MedicationRequest.
pub fn institution_of(kind: BundleKind, b: &Value) -> Option<String> {
    if kind == BundleKind::MedicationRequest {
        return b["extension"]
            .as_array()?
            .iter()
            .find_map(|e| e.pointer("/valueIdentifier/value").and_then(Value::as_str))
            .map(str::to_string);
    }
    b.pointer("/identifier/value")
        .and_then(Value::as_str)?
        .split('^')
        .next()
        .map(str::to_string)
}

/// Eligibility records (資格情報) of the people, `per` persons to a Bundle of Patient and Coverage.
pub fn eligibility_bundles(people: &[PersonOutput], per: usize) -> Vec<String> {
    people
        .chunks(per.max(1))
        .map(|chunk| {
            let persons: Vec<&kizuna_synth::population::Person> =
                chunk.iter().map(|po| &po.person).collect();
            kizuna_synth::eligibility::bundle(&persons).to_string()
        })
        .collect()
}

/// Every submission of the people. A discharge summary sent on its own goes back to the patient's
/// clinic (the institution of their condition bundles); one written at the clinic itself is not
/// sent.
pub fn submissions(people: &[PersonOutput]) -> Vec<Submission> {
    let mut out = Vec::new();
    for po in people {
        let clinic = po
            .bundles
            .iter()
            .find(|(k, _)| *k == BundleKind::Condition)
            .and_then(|(_, b)| serde_json::from_str::<Value>(b).ok())
            .and_then(|b| institution_of(BundleKind::Condition, &b));
        for (kind, text) in &po.bundles {
            let Ok(b) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            let Some(from) = institution_of(*kind, &b) else {
                continue;
            };
            let destination = match kind {
                BundleKind::Discharge => match &clinic {
                    Some(c) if *c != from => Some(c.clone()),
                    _ => continue,
                },
                _ => None,
            };
            out.push(Submission {
                kind: *kind,
                from,
                body: text.clone(),
                destination,
                resources: resources_in(&b),
            });
        }
    }
    out
}

/// Resources a submission carries: a Bundle's entries, or one for a lone resource.
pub fn resources_in(body: &Value) -> u64 {
    body["entry"]
        .as_array()
        .map(|a| a.len() as u64)
        .unwrap_or(1)
}
